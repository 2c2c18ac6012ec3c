"""The engine's settings (`EngineConfig`), from a bundle's KV plan or given by hand."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from dwc.constants import MAX_GRAPH_TOKENS, NGRAM_K


@dataclass
class EngineConfig:
    block_size: int = 16
    num_blocks: int | None = None          # None: from the KV budget
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    device: str | None = None              # None: cuda when present, else cpu
    dtype: str | None = None               # None: bfloat16 on cuda, float32 on cpu
    kv_dtype: str | None = None            # "fp8_e4m3", or None: the compute dtype
    kv_scales: list | None = None          # per layer (k_scale, v_scale) for FP8
    cuda_graphs: bool = True               # GPU: replay captured decode steps
    piecewise_graphs: bool = True          # GPU: and the other steps, captured piecewise
    speculative: bool = True               # use the bundle's draft when it has one
    num_speculative_tokens: int | None = None  # K; None: the bundle's measured choice
    speculative_method: str | None = None  # "ngram": prompt lookup, no draft model
    async_scheduling: bool = True          # overlap the host's next step with the GPU's
    tensor_parallel: int = 1               # processes (GPUs) the model is split across
    tensor_parallel_backend: str | None = None  # None: nccl on cuda, gloo on cpu
    kv_host_gib: float = 0.0               # host-memory tier under the prefix cache (0: off)

    @classmethod
    def from_plan(cls, plan: dict, **overrides) -> "EngineConfig":
        """The settings of a bundle's KV plan (manifest `kv_cache`), some overridden."""
        fp8 = plan["dtype"] == "fp8_e4m3"
        return cls(**{"block_size": plan["block_size"], "num_blocks": plan["num_blocks"],
                      "max_num_seqs": plan["max_num_seqs"],
                      "max_num_batched_tokens": plan["max_num_batched_tokens"],
                      "kv_dtype": "fp8_e4m3" if fp8 else None,
                      "kv_scales": plan.get("kv_scales"),
                      "tensor_parallel": plan.get("tensor_parallel", 1),
                      "kv_host_gib": plan.get("host_gib", 0.0), **overrides})


def from_bundle(bundle: Path, config: EngineConfig | None, speculative: bool,
                tensor_parallel: int | None, ngram: bool = False,
                kv_host_gib: float | None = None) -> tuple:
    """Engine's arguments for a bundle: (model_dir, config, draft_dir, draft_k, fusion).
    Refuses a bundle whose files do not match its manifest, and one of another backend.
    The config comes from the bundle's KV plan unless one is given; the draft is used
    as the build chose (a draft model or n-gram lookup, with its K) when `speculative` is
    True; `ngram`: n-gram lookup whatever the build chose."""
    from dwc.bundle.reader import open_bundle
    from dwc.errors import BadInput
    from dwc.formats import manifest as mf

    manifest = open_bundle(bundle)
    if manifest["target"]["backend"] != mf.RUNTIME_BACKEND:
        raise BadInput(f"{bundle}: a {manifest['target']['backend']} bundle; dwc's runtime "
                       f"runs {mf.RUNTIME_BACKEND} bundles")
    plan = manifest["kv_cache"]
    if config is None and plan.get("num_blocks"):
        config = EngineConfig.from_plan(plan)
    if tensor_parallel:
        config = replace(config or EngineConfig(), tensor_parallel=tensor_parallel)
    if kv_host_gib is not None:
        config = replace(config or EngineConfig(), kv_host_gib=kv_host_gib)
    method = mf.speculation(manifest.get("draft")) if speculative else None
    if ngram or method == "ngram":
        config = replace(config or EngineConfig(), speculative_method="ngram", speculative=True)
    draft = manifest["draft"] if method and not ngram else None
    # A draft model or an EAGLE head (eagle.json) lives in draft/.
    draft_dir = Path(bundle) / mf.DRAFT_DIR if method in ("draft_model", "eagle") and \
        not ngram else None
    fusion = (manifest.get("fusion") or {}).get("plan")
    return (Path(bundle) / mf.MODEL_DIR, config, draft_dir, draft["k"] if draft else 0,
            fusion)


def speculative_tokens(c: EngineConfig, draft_dir, draft_k: int, ngram: bool) -> int:
    """K: the config's, else the bundle's measured choice, else (n-gram lookup asked for
    at serving time) NGRAM_K."""
    if not c.speculative or not (draft_dir or ngram):
        return 0
    return c.num_speculative_tokens or draft_k or NGRAM_K


def runner_args(c: EngineConfig, model_dir: Path, num_blocks: int, k: int, device: str,
                 fusion: dict | None) -> tuple[int, dict]:
    """(tokens the decode graphs cover, the ModelRunner's keyword arguments). Graphs
    cover steps of up to max_num_seqs sequences of 1 + K tokens (capped); gloo's
    collectives (tensor parallelism sharing a GPU) cannot be captured, NCCL's can."""
    gloo = c.tensor_parallel > 1 and c.tensor_parallel_backend == "gloo"
    graph = min(c.max_num_seqs * (1 + k), MAX_GRAPH_TOKENS) if c.cuda_graphs and not gloo else 0
    pieces = c.max_num_batched_tokens if c.cuda_graphs and c.piecewise_graphs else 0
    return graph, dict(num_blocks=num_blocks, block_size=c.block_size, device=device,
                       weights_dir=model_dir, kv_dtype=c.kv_dtype, kv_scales=c.kv_scales,
                       graph_tokens=graph, fusion=fusion, piecewise_tokens=pieces)
