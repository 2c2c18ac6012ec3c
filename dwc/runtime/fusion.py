"""The fusion plan the `fuse` pass writes and the runtime applies when it loads a bundle.

    plan = {"qkv": True, "gate_up": True, "norm_residual": True, "silu_mul": True,
            "rope_kv": True}

- qkv / gate_up: q, k and v (gate and up) read the same input, so their weights are
  stacked into one GEMM whose output is split (one launch and one pass over the input
  instead of three). Plain Linears are stacked here; the GPU's quantized Linears are
  stacked from the bundle's compressed-tensors tensors in `merge_raw` (per-channel weight
  scales stack as they are; a static per-tensor input scale becomes the largest of the
  parts', which is exact when calibration gave them the same input, as it does).
- norm_residual: the residual add and the next RMSNorm in one Triton kernel.
- silu_mul: SwiGLU's silu(gate) * up in one Triton kernel on the gate/up output.
- rope_kv: rotary on q and k and the K/V cache write (FP8 scaling included) in one
  Triton kernel, instead of about a dozen elementwise kernels and two scatters.

The weights in the bundle's model/ never change: the plan is applied in memory.
"""

from __future__ import annotations

import torch

from dwc.constants import MAX_GRAPH_TOKENS

DEFAULT_PLAN = {"qkv": True, "gate_up": True, "norm_residual": True, "silu_mul": True,
                "rope_kv": True}
GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}


def fuse_linears(proj: dict, names: tuple[str, ...], key: str) -> bool:
    """Replace plain Linears proj[names] by one stacked Linear proj[key]. The originals'
    weights become views of the stacked one, so no memory is duplicated and the model
    they belong to computes exactly what it did. False (nothing changed) for other
    module types."""
    mods = [proj[n] for n in names]
    # compressed-tensors' quantized modules are Linears too, with a quantizing forward:
    # stacking their stored weights would drop the quantization. They are left alone.
    if not all(type(m) is torch.nn.Linear and getattr(m, "quantization_scheme", None) is None
               for m in mods):
        return False
    has_bias = [m.bias is not None for m in mods]
    if any(has_bias) and not all(has_bias):
        return False
    weight = torch.cat([m.weight.detach() for m in mods])
    bias = torch.cat([m.bias.detach() for m in mods]) if all(has_bias) else None
    fused = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                            device=weight.device, dtype=weight.dtype)
    fused.weight = torch.nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        fused.bias = torch.nn.Parameter(bias, requires_grad=False)
    row = 0
    for m in mods:
        n = m.weight.shape[0]
        m.weight = torch.nn.Parameter(fused.weight[row:row + n], requires_grad=False)
        if bias is not None:
            m.bias = torch.nn.Parameter(fused.bias[row:row + n], requires_grad=False)
        row += n
    for n in names:
        del proj[n]
    proj[key] = fused
    return True


def merge_raw(parts: list[dict]) -> dict | None:
    """Stack the compressed-tensors tensors of modules sharing one input (same keys and
    dtypes) along the output dimension; None when they cannot be stacked."""
    keys = set(parts[0])
    if any(set(p) != keys for p in parts):
        return None
    merged = {}
    for key in keys:
        values = [p[key] for p in parts]
        if key == "input_scale":
            merged[key] = torch.stack([v.float().reshape(()) for v in values]).max() \
                .reshape(values[0].shape).to(values[0].dtype)
        elif key == "weight_shape":
            merged[key] = torch.tensor([sum(int(v[0]) for v in values), int(values[0][1])],
                                       dtype=values[0].dtype)
        elif key == "weight_zero_point" and "weight_packed" in keys:
            # Packed 8 rows to an int32 along the output dimension: stackable when every
            # part's rows fill whole int32s (model widths are multiples of 8).
            if any(int(p["weight_shape"][0]) % 8 for p in parts):
                return None
            merged[key] = torch.cat(values)
        else:
            merged[key] = torch.cat(values)
    return merged


def skinny_config(out_features: int, fp8: bool) -> dict:
    """The decode-size kernel's tiles for a projection (what skinny_linear launches)."""
    from dwc.runtime.kernels.skinny_tiles import BLOCK_K, BLOCK_N, split_for

    tiles = -(-out_features // BLOCK_N)
    return {"tokens": "<= 16", "BLOCK_N": BLOCK_N, "BLOCK_K": BLOCK_K,
            "SPLIT_K": split_for(tiles, fp8), "grid": [tiles, split_for(tiles, fp8)]}


def kernel_table(info, scheme: str, device: str, plan: dict) -> list[dict]:
    """Which kernel serves each op of a decoder layer under `plan`, with its shape and
    tile configuration where dwc chooses one (cuBLAS picks its own tiles per shape)."""
    gpu = device == "cuda"
    return _linear_rows(info, scheme, gpu, plan) + _elementwise_rows(info, gpu, plan) + \
        _attention_rows(gpu)


def _gemm_kernel(scheme: str, gpu: bool) -> str:
    if not gpu:
        return "compressed-tensors reference Linear (CPU)" if scheme in (
            "fp8-w8a8", "int8-w8a8", "int4-w4a16") else "torch.nn.functional.linear (CPU)"
    gemm = {"fp8-w8a8": "torch._scaled_mm (cuBLASLt FP8, row-wise scales)",
            "int8-w8a8": "torch._int_mm (cuBLASLt INT8) + scales",
            "int4-w4a16": "aten._weight_int4pack_mm (tinygemm, inner k tiles 8)"}.get(
                scheme, "torch.nn.functional.linear (cuBLAS)")
    if scheme in ("fp8-w8a8", "none"):
        gemm += "; at <= 16 tokens triton _skinny_gemm_kernel (weight-only, split-K" + \
            (", fp16 multiply)" if scheme == "fp8-w8a8" else ")")
    return gemm


def _linear_rows(info, scheme: str, gpu: bool, plan: dict) -> list[dict]:
    h, kv = info.num_heads * info.head_dim, info.num_kv_heads * info.head_dim
    i, hidden = info.intermediate_size, info.hidden_size
    gemm = _gemm_kernel(scheme, gpu)
    # On the CPU a quantized bundle keeps compressed-tensors' own modules: nothing stacks.
    stacks = gpu or scheme == "none"
    rows = []

    def linear(op, fused_from, out_features, in_features):
        row = {"op": op, "kernel": gemm, "fuses": list(fused_from),
               "shape": [in_features, out_features]}
        if gpu and scheme in ("fp8-w8a8", "none"):
            row["config"] = skinny_config(out_features, scheme == "fp8-w8a8")
        rows.append(row)

    if plan.get("qkv") and stacks:
        linear("qkv_proj", GROUPS["qkv"], h + 2 * kv, hidden)
    else:
        for name, out in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
            linear(name, [], out, hidden)
    linear("o_proj", [], hidden, h)
    if plan.get("gate_up") and stacks:
        linear("gate_up_proj", GROUPS["gate_up"], 2 * i, hidden)
    else:
        for name in ("gate_proj", "up_proj"):
            linear(name, [], i, hidden)
    linear("down_proj", [], hidden, i)
    return rows


def _elementwise_rows(info, gpu: bool, plan: dict) -> list[dict]:
    block = 1 << (info.hidden_size - 1).bit_length()
    fused_norm = gpu and plan.get("norm_residual")
    fused_act = gpu and plan.get("silu_mul") and plan.get("gate_up")
    fused_rope = gpu and plan.get("rope_kv")
    return [
        {"op": "residual_add_rms_norm",
         "kernel": "triton _add_rms_norm_kernel" if fused_norm else "torch (4 kernels)",
         "config": {"BLOCK": block, "num_warps": min(16, max(4, block // 512)),
                    "grid": "(tokens,)"} if fused_norm else {}},
        {"op": "silu_mul", "kernel": "triton _silu_mul_kernel" if fused_act else
         "torch silu + mul", "config": {"BLOCK": 1024, "grid": "(tokens, n / 1024)"}
         if fused_act else {}},
        {"op": "rotary + kv_cache_write", "kernel": "triton _rope_kv_kernel" if fused_rope
         else "torch (rotary elementwise + two scatters)",
         "config": {"grid": "(tokens, heads + kv_heads)", "HALF": info.head_dim // 2}
         if fused_rope else {}}]


def _attention_rows(gpu: bool) -> list[dict]:
    """The attention kernels and the graphs (docs/RUNTIME.md); tiles as the kernels choose
    them on the H200 (kernels/paged_attention_triton.py, kernels/paged_prefill_triton.py)."""
    if not gpu:
        return [{"op": "attention", "kernel": "torch SDPA (whole prompts padded together; "
                 "per sequence with a mask otherwise)", "config": {}},
                {"op": "steps", "kernel": "eager", "config": {}}]
    return [
        {"op": "attention (decode and verification rows)", "kernel": "triton "
         "_paged_decode_kernel", "config": {"BLOCK_N": "128 (64 for FP8 caches at >= 1024 "
                                            "programs)", "grid": "(rows, kv_heads, split)",
                                            "split": "while rows x kv_heads < SMs: "
                                            "up to 32 parts of >= 4 tiles (split-KV)"}},
        {"op": "attention (prompt chunks)", "kernel": "triton _paged_prefill_kernel "
         "(variable-length, paged, one launch per layer)",
         "config": {"rows per program": "128 (queries x the GQA group)",
                    "grid": "(query tiles, kv_heads)"}},
        {"op": "steps", "kernel": f"CUDA graphs: decode steps padded to 1..{MAX_GRAPH_TOKENS} "
         "tokens, other steps piecewise (captured between attention calls)", "config": {}}]
