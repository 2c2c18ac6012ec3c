"""KV cache arithmetic shared by the kv-layout plan, the runtime's fit check and the
quantize back-off's measurement: bytes per token, the memory a step needs besides the
cache, and FP8 scales (so all of them count and measure the cache the bundle will use)."""

from __future__ import annotations

from dwc.constants import MAX_GRAPH_TOKENS, graph_sizes

FP8_MAX = 448.0
GPU_WORKSPACE_BYTES = int(2e9)  # activations' slack, the allocator, cuBLAS / Triton workspaces


def kv_bytes_per_token(info, itemsize: int) -> int:
    """Bytes of K and V one token takes in the cache (`info`: dwc.model.checkpoint.ModelInfo)."""
    return info.num_layers * 2 * info.num_kv_heads * info.head_dim * itemsize


def step_activation_bytes(info, act_bytes: int, tp: int, gpu: bool, max_num_seqs: int,
                          budget_tokens: int, graph_rows: int | None = None) -> int:
    """Activations of one step of `budget_tokens` tokens (a few hidden-size and FFN-size
    buffers per token, 1/tp of the FFN's), the float32 logits of every sequence that
    samples, and on a GPU the logits each captured CUDA graph keeps (one buffer per
    captured size up to `graph_rows`, by default max_num_seqs capped: 1.4 GB at 512 for a
    128k vocabulary) and the piecewise graphs' pool: about one more step's activations,
    kept."""
    rows = min(max_num_seqs, MAX_GRAPH_TOKENS) if graph_rows is None else graph_rows
    graphed = sum(graph_sizes(rows)) if gpu and rows else 0
    return budget_tokens * (6 * info.hidden_size + 3 * info.intermediate_size // tp) * \
        act_bytes * (2 if gpu and tp == 1 else 1) + (max_num_seqs + graphed) * info.vocab_size * 4


def kv_scales(ctx) -> list[list[float]]:
    """Per layer [k_scale, v_scale] for an FP8 cache: the largest |K| and |V| seen in
    calibration over FP8's largest value (448). K is stored after the rotary embedding,
    which turns each pair (a, b) into a rotation of it, so |K| can reach sqrt(2) times the
    largest projection output; the K scale allows for that."""
    stats = ctx.artifacts.calibration
    if stats is None or not stats.out_absmax:
        return [[1.0, 1.0]] * ctx.info.num_layers  # vLLM's default without calibration
    scales = []
    for i in range(ctx.info.num_layers):
        k = float(stats.out_absmax[f"model.layers.{i}.self_attn.k_proj"]) * 2 ** 0.5
        v = float(stats.out_absmax[f"model.layers.{i}.self_attn.v_proj"])
        scales.append([max(k, 1e-6) / FP8_MAX, max(v, 1e-6) / FP8_MAX])
    return scales


def kv_plan_for_measuring(ctx) -> dict | None:
    """The KV cache the target will use, as `dwc.quality.gate.measure` takes it (None: bf16)."""
    if ctx.target.kv_cache_dtype != "fp8_e4m3":
        return None
    return {"dtype": "fp8_e4m3", "kv_scales": kv_scales(ctx)}
