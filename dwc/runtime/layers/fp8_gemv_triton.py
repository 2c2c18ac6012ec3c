"""FP8 weights times bf16 activations for a few tokens (decode steps), in Triton.

At one to sixteen tokens a W8A8 GEMM is a poor deal on Hopper: quantizing the
activations costs four elementwise kernels per projection, and cuBLASLt's FP8 kernels
pick tiles made for large M (measured on the H200 for the 8B shape at batch 1: 4.3 ms
of `_scaled_mm` per step against 1.8 ms of weight reads). This kernel reads each FP8
weight once, widens it to bf16 in registers and multiplies the unquantized activations:
y = x @ (w * s)^T, with s the per-output-channel weight scale. It is weight-only, so its
result is closer to the bf16 model than the W8A8 path's (which `evaluate` measured).

Each program owns BLOCK_N output channels and walks K; activations are padded to 16 rows
for tl.dot (the tensor cores), which costs nothing here: the weights dominate the bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_TOKENS = 16  # above this, the W8A8 `_scaled_mm` path


@triton.autotune(
    configs=[triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
             for bn, bk, w, s in ((16, 256, 4, 4), (32, 256, 4, 4), (16, 512, 4, 3),
                                  (32, 512, 8, 3), (64, 128, 4, 4), (64, 256, 8, 3),
                                  (16, 1024, 4, 3), (32, 1024, 8, 3), (16, 512, 4, 5),
                                  (128, 128, 8, 4))],
    key=["N", "K"])
@triton.jit
def _fp8_weight_only_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_wn,
                            stride_ym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :],
                    mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)
        w = tl.load(w_ptr + n[:, None] * stride_wn + k[None, :],
                    mask=(n[:, None] < N) & (k[None, :] < K), other=0.0)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    s = tl.load(s_ptr + n, mask=n < N, other=0.0)
    y = acc * s[None, :]
    tl.store(y_ptr + m[:, None] * stride_ym + n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(m[:, None] < M) & (n[None, :] < N))


def fp8_weight_only(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: [m <= 16, k] bf16; weight: [n, k] float8_e4m3fn (row-major); scale: [n] float32
    -> [m, n] in x's dtype."""
    m, k = x.shape
    n = weight.shape[0]
    x = x.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _fp8_weight_only_kernel[grid](x, weight, scale, y, m, n, k, x.stride(0), weight.stride(0),
                                  y.stride(0), BLOCK_M=16)
    return y
