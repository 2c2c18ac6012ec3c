"""y = x @ (w * s)^T for a few tokens (decode and verification steps), in Triton.

At 1-16 tokens a projection is a read of its weight matrix, and speed is the fraction of
the memory bandwidth the kernel reaches. Two things decide it:

- enough bytes in flight: the output dimension alone gives too few programs for 132 SMs
  when N is 4096 (o_proj, down_proj), so K is split into SPLIT slices, each program
  reading one [BLOCK_N, K / SPLIT] strip of the weight;
- no extra kernels: a separate reduction kernel per projection would cost more than the
  split saves (about 2 us each, 4 projections x 32 layers). Instead every program writes
  its fp32 partial to a workspace and bumps a per-tile counter; the program that arrives
  last sums the SPLIT partials in a fixed order (deterministic), applies the scale,
  writes y and resets the counter to zero for the next call.

The weight is the A operand of the dot in its own row-major layout ([BLOCK_N, BLOCK_K],
K contiguous) and the padded activations the B operand, so the large tile is never
transposed. FP8 E4M3 weights are widened to fp16 in registers (exact; one conversion
instruction per pair, where bf16 takes several: measured 1.2-1.6x faster) and multiplied
with the activations in fp16, clamped to its range (weight-only: the activations are not
quantized); bf16 weights are used as they are.

Tried and measured slower (H100, 2026-12-07, benchmarks/gemv_gpu.py): W8A8 in this
kernel, the activations quantized in its loads and FP8 multiplied by FP8 on the tensor
cores (no widening): 0.33-0.47x the weight-only kernel's GB/s at one token, 0.84-1.05x
at 16 tokens.

The tiles and the split per shape are in skinny_tiles.py (measured; no Triton needed to
read them, so the CPU-side kernel table can report them).

The workspace and counters (workspace.py) are shared by every split kernel on a device:
calls must run on one stream, one after another (the runtime's case).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dwc.runtime.kernels.skinny_tiles import BLOCK_K, BLOCK_N, split_for
from dwc.runtime.kernels.workspace import workspace

MAX_TOKENS = 16  # rows of the padded activation tile; more tokens take the GEMM path


@triton.jit(do_not_specialize=["M"])
def _skinny_gemm_kernel(x_ptr, w_ptr, s_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm,
                        stride_wn, stride_ym, HAS_SCALE: tl.constexpr, SPLIT: tl.constexpr,
                        F16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    k_per = tl.cdiv(K, SPLIT * BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_per
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in range(k_lo, tl.minimum(k_lo + k_per, K), BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + n[:, None] * stride_wn + k[None, :],
                    mask=(n[:, None] < N) & (k[None, :] < K), other=0.0)
        x = tl.load(x_ptr + m[None, :] * stride_xm + k[:, None],
                    mask=(m[None, :] < M) & (k[:, None] < K), other=0.0)
        if F16:  # FP8 E4M3 widens to fp16 in one instruction per pair; bf16 takes more
            acc += tl.dot(w.to(tl.float16), tl.clamp(x, -65504.0, 65504.0).to(tl.float16))
        else:
            acc += tl.dot(w.to(x.dtype), x)
    if HAS_SCALE:
        acc *= tl.load(s_ptr + n, mask=n < N, other=0.0)[:, None]
    out = y_ptr + m[None, :] * stride_ym + n[:, None]
    out_mask = (m[None, :] < M) & (n[:, None] < N)
    if SPLIT == 1:
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        part = ws_ptr + (pid_k * BLOCK_M + m[None, :]) * N + n[:, None]
        tl.store(part, acc, mask=n[:, None] < N)
        tl.debug_barrier()  # every thread's partial is written before the counter moves
        if tl.atomic_add(cnt_ptr + pid_n, 1) == SPLIT - 1:  # acq_rel: the others' are visible
            total = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            for i in range(SPLIT):  # fixed order: the same sum every run
                total += tl.load(ws_ptr + (i * BLOCK_M + m[None, :]) * N + n[:, None],
                                 mask=n[:, None] < N, other=0.0, cache_modifier=".cg")
            tl.store(out, total.to(y_ptr.dtype.element_ty), mask=out_mask)
            tl.store(cnt_ptr + pid_n, 0)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor,
                  scale: torch.Tensor | None = None) -> torch.Tensor:
    """x @ (weight * scale)^T for x: [m <= MAX_TOKENS, k] bf16, weight: [n, k] FP8 E4M3
    (with `scale` [n] float32) or bf16, with the measured tiles."""
    fp8 = weight.dtype == torch.float8_e4m3fn
    split = split_for(triton.cdiv(weight.shape[0], BLOCK_N), fp8)
    # FP8 multiplies in fp16 (one conversion instruction per pair of weights; measured
    # 1.3x faster than bf16 here); the activations are clamped to fp16's range.
    return skinny_gemm(x, weight, scale, BLOCK_N, BLOCK_K, split, f16=fp8)


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
                block_n: int, block_k: int, split: int, warps: int = 4,
                stages: int = 4, f16: bool = False) -> torch.Tensor:
    """x: [m <= 16, k] bf16; weight: [n, k] (row-major) float8_e4m3fn or bf16; scale: [n]
    float32 per output channel or None -> [m, n] in x's dtype. `f16`: multiply in fp16
    (exact for FP8 E4M3 weights; x clamped to +-65504)."""
    m, k = x.shape
    n = weight.shape[0]
    assert weight.stride(1) == 1, "skinny_gemm: the weight's rows must be contiguous"
    x = x.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    tiles = triton.cdiv(n, block_n)
    ws, cnt = workspace(x.device, split * MAX_TOKENS * n, tiles)
    _skinny_gemm_kernel[(tiles, split)](
        x, weight, scale if scale is not None else y, y, ws, cnt, m, n, k, x.stride(0),
        weight.stride(0), y.stride(0), HAS_SCALE=scale is not None, SPLIT=split,
        F16=f16, BLOCK_M=MAX_TOKENS, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
        num_stages=stages)
    return y
