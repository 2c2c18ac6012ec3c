"""Tiles of the decode-size split-K kernel (skinny_gemm_triton.py), as measured.

Chosen by benchmarks/gemv_gpu.py on the H200 (8B-shape projections at 1 and 16 tokens,
weights cycled through more memory than the 50 MB L2 holds; results in
benchmarks/results/h200-2026-11-24-gemv.json): BLOCK_N 64, BLOCK_K 128 and 4 warps were
best or within 3% for every shape. The best split depends on how many 64-row tiles the
output has and on the weight's width: FP8 rows are half the bytes, so FP8 wants more
programs in flight. With these tiles FP8 reads at 1.8-3.0 TB/s (the unsplit kernel it
replaced: 1.4-2.7) and bf16 at 2.9-4.1 TB/s (cuBLAS: 2.6-4.0).
"""

BLOCK_N = 64
BLOCK_K = 128


def split_for(tiles: int, fp8: bool) -> int:
    """K slices per output tile: FP8 wants >= 256 programs (2 slices for the wide
    gate/up), bf16 about 96 (1 slice unless N is narrow)."""
    if fp8:
        return 2 if tiles >= 256 else 4
    return 1 if tiles >= 96 else 2
