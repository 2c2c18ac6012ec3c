"""Quantized Linears for the GPU, built from the bundle's compressed-tensors tensors.

- FP8 W8A8 (per-channel weight scales, static per-tensor input scale): the input is
  quantized with the calibrated scale and multiplied by `torch._scaled_mm` with row-wise
  scales (Hopper's FP8 tensor cores); at up to 16 tokens, weight-only in Triton
  (skinny_gemm_triton.py).
- INT8 W8A8 (per-channel weights; per-token dynamic or static per-tensor input scales):
  `torch._int_mm`, int32 accumulation, then both scales.
- INT4 W4A16 (groups with zero points): PyTorch's tinygemm kernel
  (`_weight_int4pack_mm`, the one gpt-fast uses), after converting compressed-tensors'
  w = (q - zp) * s into tinygemm's w = (u - 8) * s + z with u = q + 8, z = -zp * s.

On the CPU the runtime keeps compressed-tensors' own modules (the reference path).
"""

from __future__ import annotations

import torch

from dwc.constants import MAX_GRAPH_TOKENS

class Fp8Linear(torch.nn.Module):
    """W8A8 through `_scaled_mm`; at up to 16 tokens (decode), weight-only in Triton
    (skinny_gemm_triton.py), where quantizing the activations costs more than it saves:
    at one token cuBLASLt's FP8 GEMM plus the four elementwise kernels that quantize the
    input took 4.3 ms per 8B-shape step, against 1.8 ms of weight reads."""

    def __init__(self, weight, weight_scale, input_scale, bias):
        super().__init__()
        self.weight_t = weight.t()                                   # [in, out] fp8, col-major
        self.scale_b = weight_scale.float().reshape(1, -1)          # [1, out]
        self.input_scale = input_scale.float().reshape(1, 1)        # [1, 1]
        self.bias = bias
        self._row_scales: dict[int, torch.Tensor] = {}  # tokens -> [t, 1] input scale

    @staticmethod
    def takes_skinny(rows: int) -> bool:
        """Whether an input of `rows` tokens goes to the split-K kernel (else `_scaled_mm`)."""
        from dwc.runtime.kernels.skinny_gemm_triton import MAX_TOKENS

        return rows <= MAX_TOKENS

    def forward(self, x):          # x: [t, in] bf16, or FP8 already divided by input_scale
        from dwc.runtime.kernels.fused_triton import quantize_fp8
        from dwc.runtime.kernels.skinny_gemm_triton import skinny_linear

        if x.dtype == torch.float8_e4m3fn:  # a fused norm / SwiGLU kernel quantized it
            xq = x
        elif self.takes_skinny(x.shape[0]) and x.dtype == torch.bfloat16:
            y = skinny_linear(x, self.weight_t.t(), self.scale_b.view(-1))
            return y if self.bias is None else y + self.bias
        else:
            xq = quantize_fp8(x, self.input_scale)
        t = x.shape[0]
        scale_a = self._row_scales.get(t)                            # row-wise: [t, 1]
        if scale_a is None:
            scale_a = self.input_scale.expand(t, 1).contiguous()
            if t <= MAX_GRAPH_TOKENS:  # graphed step sizes: made once, captured graphs reuse it
                self._row_scales[t] = scale_a
        # An FP8 input comes from a bf16 model's fused kernel (Decoder._fp8_input).
        out_dtype = torch.bfloat16 if x.dtype == torch.float8_e4m3fn else x.dtype
        y = torch._scaled_mm(xq, self.weight_t, scale_a=scale_a, scale_b=self.scale_b,
                             out_dtype=out_dtype)
        return y if self.bias is None else y + self.bias


class Int8Linear(torch.nn.Module):
    def __init__(self, weight, weight_scale, input_scale, bias):
        super().__init__()
        self.weight_t = weight.t()                                   # [in, out] int8, col-major
        self.scale_w = weight_scale.float().reshape(1, -1)          # [1, out]
        self.input_scale = None if input_scale is None else input_scale.float().reshape(1, 1)
        self.bias = bias

    def forward(self, x):                                            # x: [t, in] bf16
        xf = x.float()
        scale = self.input_scale if self.input_scale is not None else \
            xf.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127.0  # [t, 1]
        xq = (xf / scale).round().clamp(-128, 127).to(torch.int8)
        t = x.shape[0]
        rows = max(32, -(-t // 8) * 8)                               # _int_mm needs M > 16
        if rows != t:
            xq = torch.nn.functional.pad(xq, (0, 0, 0, rows - t))
        acc = torch._int_mm(xq, self.weight_t)[:t]                   # [t, out] int32
        y = (acc.float() * scale * self.scale_w).to(x.dtype)
        return y if self.bias is None else y + self.bias


class Int4Linear(torch.nn.Module):
    INNER_K_TILES = 8

    def __init__(self, q, zero_point, scale, group_size, bias):
        """q: [out, in] int8 in [-8, 7]; zero_point: [out, in / g] int8; scale: [out, in / g]."""
        super().__init__()
        u = (q.to(torch.int32) + 8).to(torch.uint8)                  # [out, in] in [0, 15]
        packed = (u[:, ::2] << 4 | u[:, 1::2]).contiguous()         # [out, in / 2]
        self.weight = torch.ops.aten._convert_weight_to_int4pack(packed, self.INNER_K_TILES)
        zeros = -zero_point.float() * scale.float()
        self.scales_and_zeros = torch.stack([scale.float(), zeros], dim=-1) \
            .transpose(0, 1).contiguous().to(torch.bfloat16)        # [in / g, out, 2]
        self.group_size = group_size
        self.bias = bias

    def forward(self, x):                                            # x: [t, in] bf16
        y = torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16), self.weight,
                                               self.group_size, self.scales_and_zeros)
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias


class SkinnyLinear(torch.nn.Module):
    """A plain bf16 Linear on the GPU: decode-sized inputs (<= 16 tokens) through the
    split-K Triton kernel, which reads the weight faster than cuBLAS does at these sizes
    (skinny_gemm_triton.py); larger inputs through cuBLAS."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x):
        from dwc.runtime.kernels.skinny_gemm_triton import MAX_TOKENS, skinny_linear

        if x.shape[0] <= MAX_TOKENS and x.dtype == torch.bfloat16 == self.weight.dtype:
            y = skinny_linear(x, self.weight)
            return y if self.bias is None else y + self.bias
        return torch.nn.functional.linear(x, self.weight, self.bias)


def gpu_linear(module, tensors: dict, bias=False):
    """The kernel-backed replacement of one compressed-tensors Linear, from its raw
    tensors ({"weight" | "weight_packed", "weight_scale", ...}), or None to keep it.
    `bias` overrides the module's (for stacked projections)."""
    scheme = getattr(module, "quantization_scheme", None)
    if scheme is None or scheme.weights is None:
        return None
    w, acts = scheme.weights, scheme.input_activations
    bias = module.bias if bias is False else bias
    if w.type == "float" and w.num_bits == 8 and acts is not None and not acts.dynamic:
        return Fp8Linear(tensors["weight"], tensors["weight_scale"], tensors["input_scale"], bias)
    if w.type == "int" and w.num_bits == 8 and acts is not None:
        static = tensors.get("input_scale") if not acts.dynamic else None
        return Int8Linear(tensors["weight"], tensors["weight_scale"], static, bias)
    if w.type == "int" and w.num_bits == 4 and acts is None and w.group_size:
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        shape = torch.Size(tensors["weight_shape"].tolist())
        scale = tensors["weight_scale"]
        q = unpack_from_int32(tensors["weight_packed"], 4, shape)
        zp = unpack_from_int32(tensors["weight_zero_point"], 4, scale.shape, packed_dim=0) \
            if "weight_zero_point" in tensors else torch.zeros_like(scale, dtype=torch.int8)
        return Int4Linear(q, zp, scale, w.group_size, bias)
    return None


def raw_tensors(model_dir, device) -> dict[str, dict[str, torch.Tensor]]:
    """The checkpoint's tensors grouped by module: {"model.layers.0.mlp.up_proj": {...}}."""
    from pathlib import Path

    from safetensors import safe_open

    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(path, framework="pt", device=str(device)) as f:
            for key in f.keys():
                module, _, name = key.rpartition(".")
                grouped.setdefault(module, {})[name] = f.get_tensor(key)
    return grouped
