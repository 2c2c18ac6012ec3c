"""Fused elementwise kernels for the GPU (the `fuse` pass's plan; torch fallbacks in
norm.py and activation.py give the same results on the CPU).

- `add_rms_norm`: residual add and RMSNorm in one pass over the row: r' = x + r (rounded
  to the activation dtype, as the unfused add stores it), y = w * norm(r'). One read of
  x and r, one write of y and r', instead of five kernels and their round trips.
- `silu_mul`: SwiGLU's silu(gate) * up on the fused gate/up projection's output.

Both can write their output quantized to FP8 E4M3 for the FP8 GEMM that reads it
(`out_scale`: that Linear's static input scale): rounded to the activation dtype first,
then divided and saturated exactly as quantize_fp8 does, so the bits are those of the
unfused pair, without quantize_fp8's extra read and write of the activations (6.0 ms of a
126 ms 4 x 2048-token prefill of the 8B shape, H200 2026-12-04).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, r_out_ptr, scale_ptr, n_cols, eps,
                         HAS_RESIDUAL: tl.constexpr, FP8_OUT: tl.constexpr,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * n_cols + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)   # the stored residual
        tl.store(r_out_ptr + row * n_cols + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = (xf * inv).to(x.dtype).to(tl.float32) * w.to(tl.float32)
    if FP8_OUT:
        y = _to_fp8(y.to(x.dtype), scale_ptr)
    tl.store(y_ptr + row * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float, out_scale: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [tokens, hidden] -> (rms_norm(x + residual), x + residual); the first
    in FP8 E4M3 as quantize_fp8(y, out_scale) when `out_scale` is given."""
    x = x.contiguous()
    rows, cols = x.shape
    y = torch.empty_like(x, dtype=_out_dtype(x, out_scale))
    r_out = torch.empty_like(x) if residual is not None else x
    block = triton.next_power_of_2(cols)
    _add_rms_norm_kernel[(rows,)](x, residual.contiguous() if residual is not None else x,
                                  weight, y, r_out, out_scale if out_scale is not None else x,
                                  cols, eps, HAS_RESIDUAL=residual is not None,
                                  FP8_OUT=out_scale is not None, BLOCK=block,
                                  num_warps=min(16, max(4, block // 512)))
    return y, r_out


def _out_dtype(x: torch.Tensor, out_scale: torch.Tensor | None) -> torch.dtype:
    return torch.float8_e4m3fn if out_scale is not None else x.dtype


@triton.jit
def _to_fp8(y, scale_ptr):
    """quantize_fp8's arithmetic on a tile already rounded to the activation dtype."""
    return tl.clamp(tl.div_rn(y.to(tl.float32), tl.load(scale_ptr)), -448.0, 448.0) \
        .to(tl.float8e4nv)


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, scale_ptr, n, FP8_OUT: tl.constexpr,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0)
    block = tl.program_id(1)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    g = tl.load(gu_ptr + row * 2 * n + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * 2 * n + n + cols, mask=mask, other=0.0)
    silu = (g / (1.0 + tl.exp(-g))).to(u.dtype)                 # torch's silu, rounded
    y = silu * u
    if FP8_OUT:
        y = _to_fp8(y, scale_ptr)
    tl.store(out_ptr + row * n + cols, y, mask=mask)


SILU_BLOCK = 1024


def silu_mul(gate_up: torch.Tensor, out_scale: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up: [tokens, 2 n] (gate then up) -> silu(gate) * up: [tokens, n]; in FP8 E4M3
    as quantize_fp8(that, out_scale) when `out_scale` is given."""
    gate_up = gate_up.contiguous()
    rows, two_n = gate_up.shape
    n = two_n // 2
    out = torch.empty(rows, n, dtype=_out_dtype(gate_up, out_scale), device=gate_up.device)
    _silu_mul_kernel[(rows, triton.cdiv(n, SILU_BLOCK))](
        gate_up, out, out_scale if out_scale is not None else gate_up, n,
        FP8_OUT=out_scale is not None, BLOCK=SILU_BLOCK)
    return out


@triton.jit
def _rope_kv_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slots_ptr, cache_ptr, q_out_ptr,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                    stride_rot, stride_plane, stride_slot, stride_ch, stride_ot, stride_oh,
                    k_scale, v_scale, H: tl.constexpr, KVH: tl.constexpr,
                    BLOCK_H: tl.constexpr, BLOCK_KV: tl.constexpr, HALF: tl.constexpr,
                    FP8: tl.constexpr):
    # One program per token, every head at once: a program per (token, head) moved 256
    # bytes each and left a 4 x 2048-token prefill of the 8B shape at 6.8 ms (H200).
    t = tl.program_id(0)
    d = tl.arange(0, HALF)
    c = tl.load(cos_ptr + t * stride_rot + d).to(tl.float32)[None, :]   # cos and sin repeat
    s = tl.load(sin_ptr + t * stride_rot + d).to(tl.float32)[None, :]   # over the halves
    h = tl.arange(0, BLOCK_H)[:, None]
    hm = h < H
    base = q_ptr + t * stride_qt + h * stride_qh + d[None, :]
    x1 = tl.load(base, mask=hm, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=hm, other=0.0).to(tl.float32)
    out = q_out_ptr + t * stride_ot + h * stride_oh + d[None, :]
    tl.store(out, (x1 * c - x2 * s).to(q_out_ptr.dtype.element_ty), mask=hm)
    tl.store(out + HALF, (x2 * c + x1 * s).to(q_out_ptr.dtype.element_ty), mask=hm)
    kh = tl.arange(0, BLOCK_KV)[:, None]
    km = kh < KVH
    base = k_ptr + t * stride_kt + kh * stride_kh + d[None, :]
    x1 = tl.load(base, mask=km, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=km, other=0.0).to(tl.float32)
    r1 = x1 * c - x2 * s
    r2 = x2 * c + x1 * s
    vb = v_ptr + t * stride_vt + kh * stride_vh + d[None, :]
    v1 = tl.load(vb, mask=km, other=0.0).to(tl.float32)
    v2 = tl.load(vb + HALF, mask=km, other=0.0).to(tl.float32)
    if FP8:  # an FP8 cache holds K / k_scale and V / v_scale, saturated
        r1 = tl.clamp(r1 / k_scale, -448.0, 448.0)
        r2 = tl.clamp(r2 / k_scale, -448.0, 448.0)
        v1 = tl.clamp(v1 / v_scale, -448.0, 448.0)
        v2 = tl.clamp(v2 / v_scale, -448.0, 448.0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    kc = cache_ptr + slot * stride_slot + kh * stride_ch + d[None, :]
    vc = kc + stride_plane
    ty = cache_ptr.dtype.element_ty
    tl.store(kc, r1.to(ty), mask=km)
    tl.store(kc + HALF, r2.to(ty), mask=km)
    tl.store(vc, v1.to(ty), mask=km)
    tl.store(vc + HALF, v2.to(ty), mask=km)


def rope_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor, slots: torch.Tensor, cache: torch.Tensor,
            scales: tuple[float, float], out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary on q and k, and k, v written to the cache at `slots`, in one kernel.

    q: [t, heads, d]; k, v: [t, kv_heads, d] (views of the stacked QKV output are fine);
    cos, sin: [t, d]; cache: [2, slots, kv_heads, d]. Returns the rotated q [t, heads, d],
    in `out` when given (a captured piece's static buffer, piecewise_graphs.py).
    """
    t, heads, d = q.shape
    kv_heads = k.shape[1]
    q_out = torch.empty(t, heads, d, dtype=q.dtype, device=q.device) if out is None else out
    block_h = triton.next_power_of_2(heads)
    _rope_kv_kernel[(t,)](
        q, k, v, cos, sin, slots, cache, q_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), cache.stride(0), cache.stride(1), cache.stride(2),
        q_out.stride(0), q_out.stride(1), float(scales[0]), float(scales[1]),
        H=heads, KVH=kv_heads, BLOCK_H=block_h, BLOCK_KV=triton.next_power_of_2(kv_heads),
        HALF=d // 2, FP8=cache.dtype == torch.float8_e4m3fn,
        num_warps=min(8, max(1, block_h * d // 1024)))
    return q_out


@triton.jit
def _quantize_fp8_kernel(x_ptr, scale_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n, other=0.0).to(tl.float32)
    y = tl.clamp(tl.div_rn(x, tl.load(scale_ptr)), -448.0, 448.0)  # IEEE, as torch divides
    tl.store(y_ptr + i, y.to(tl.float8e4nv), mask=i < n)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 E4M3 of x / scale, saturated (scale: a one-element float32 tensor), in one
    kernel: the PyTorch expression takes four (widen, divide, clamp, narrow), 1.6 ms of
    a 6.8 ms batch-128 step of the 8B shape (measured on the H200)."""
    x = x.contiguous()
    y = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    n = x.numel()
    _quantize_fp8_kernel[(triton.cdiv(n, 1024),)](x, scale, y, n, BLOCK=1024)
    return y
