"""Fused elementwise kernels for the GPU (the `fuse` pass's plan; torch fallbacks in
norm.py and activation.py give the same results on the CPU).

- `add_rms_norm`: residual add and RMSNorm in one pass over the row: r' = x + r (rounded
  to the activation dtype, as the unfused add stores it), y = w * norm(r'). One read of
  x and r, one write of y and r', instead of five kernels and their round trips.
- `silu_mul`: SwiGLU's silu(gate) * up on the fused gate/up projection's output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, r_out_ptr, n_cols, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
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
    tl.store(y_ptr + row * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [tokens, hidden] -> (rms_norm(x + residual), x + residual)."""
    x = x.contiguous()
    rows, cols = x.shape
    y = torch.empty_like(x)
    r_out = torch.empty_like(x) if residual is not None else x
    block = triton.next_power_of_2(cols)
    _add_rms_norm_kernel[(rows,)](x, residual.contiguous() if residual is not None else x,
                                  weight, y, r_out, cols, eps,
                                  HAS_RESIDUAL=residual is not None, BLOCK=block,
                                  num_warps=min(16, max(4, block // 512)))
    return y, r_out


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, n, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    block = tl.program_id(1)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    g = tl.load(gu_ptr + row * 2 * n + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * 2 * n + n + cols, mask=mask, other=0.0)
    silu = (g / (1.0 + tl.exp(-g))).to(u.dtype)                 # torch's silu, rounded
    tl.store(out_ptr + row * n + cols, silu * u, mask=mask)


SILU_BLOCK = 1024


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [tokens, 2 n] (gate then up) -> silu(gate) * up: [tokens, n]."""
    gate_up = gate_up.contiguous()
    rows, two_n = gate_up.shape
    n = two_n // 2
    out = torch.empty(rows, n, dtype=gate_up.dtype, device=gate_up.device)
    _silu_mul_kernel[(rows, triton.cdiv(n, SILU_BLOCK))](gate_up, out, n, BLOCK=SILU_BLOCK)
    return out


@triton.jit
def _rope_kv_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slots_ptr, cache_ptr, q_out_ptr,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                    stride_rot, stride_plane, stride_slot, stride_ch, stride_ot, stride_oh,
                    k_scale, v_scale, H: tl.constexpr, HALF: tl.constexpr, FP8: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)                 # query heads first, then KV heads
    d = tl.arange(0, HALF)
    c = tl.load(cos_ptr + t * stride_rot + d).to(tl.float32)   # cos and sin repeat
    s = tl.load(sin_ptr + t * stride_rot + d).to(tl.float32)   # over the two halves
    if h < H:
        base = q_ptr + t * stride_qt + h * stride_qh
        x1 = tl.load(base + d).to(tl.float32)
        x2 = tl.load(base + HALF + d).to(tl.float32)
        out = q_out_ptr + t * stride_ot + h * stride_oh
        tl.store(out + d, (x1 * c - x2 * s).to(q_out_ptr.dtype.element_ty))
        tl.store(out + HALF + d, (x2 * c + x1 * s).to(q_out_ptr.dtype.element_ty))
    else:
        kh = h - H
        slot = tl.load(slots_ptr + t)
        base = k_ptr + t * stride_kt + kh * stride_kh
        x1 = tl.load(base + d).to(tl.float32)
        x2 = tl.load(base + HALF + d).to(tl.float32)
        r1 = x1 * c - x2 * s
        r2 = x2 * c + x1 * s
        vb = v_ptr + t * stride_vt + kh * stride_vh
        v1 = tl.load(vb + d).to(tl.float32)
        v2 = tl.load(vb + HALF + d).to(tl.float32)
        if FP8:  # an FP8 cache holds K / k_scale and V / v_scale, saturated
            r1 = tl.clamp(r1 / k_scale, -448.0, 448.0)
            r2 = tl.clamp(r2 / k_scale, -448.0, 448.0)
            v1 = tl.clamp(v1 / v_scale, -448.0, 448.0)
            v2 = tl.clamp(v2 / v_scale, -448.0, 448.0)
        kc = cache_ptr + slot.to(tl.int64) * stride_slot + kh * stride_ch
        vc = kc + stride_plane
        ty = cache_ptr.dtype.element_ty
        tl.store(kc + d, r1.to(ty))
        tl.store(kc + HALF + d, r2.to(ty))
        tl.store(vc + d, v1.to(ty))
        tl.store(vc + HALF + d, v2.to(ty))


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
    _rope_kv_kernel[(t, heads + kv_heads)](
        q, k, v, cos, sin, slots, cache, q_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), cache.stride(0), cache.stride(1), cache.stride(2),
        q_out.stride(0), q_out.stride(1), float(scales[0]), float(scales[1]),
        H=heads, HALF=d // 2, FP8=cache.dtype == torch.float8_e4m3fn)
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
