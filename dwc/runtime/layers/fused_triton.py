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
