"""Decode attention over the paged KV cache, as one Triton kernel for the whole batch.

One program per (sequence, KV head, split): it loads the query rows of every query head
that shares that KV head (GQA), walks its part of the sequence's context in tiles of
BLOCK_N tokens through the block table, and keeps a running (online) softmax, so K and V
are read once per KV head. An FP8 cache is multiplied in fp16. Longer chunks go to the
paged prefill kernel (paged_prefill_triton.py).

Split-KV (flash-decoding): with few sequences, one program per (sequence, KV head) is too
few to pull the context at the memory's rate (batch 1 at 8k context read 0.1-0.25 TB/s,
H200 2026-12-04). Then each (sequence, KV head) is dealt to up to MAX_SPLIT programs, each
taking a run of whole tiles; every program writes its unnormalised output, running max
and sum to the shared workspace (workspace.py) and bumps a counter, and the one that
arrives last combines them in a fixed order (deterministic) and resets the counter. A
context of one tile is one program's, written directly: short contexts pay nothing.
The number of parts depends only on the number of sequences, so a captured graph keeps
it whatever the contexts grow to; it is a run-time argument, so the kernel compiles
once for the split path and once for the plain one, at graph capture (a constant per
count compiled new variants inside mixed steps, seconds each: H100, 2026-12-07).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dwc.runtime.kernels.workspace import multiprocessors, workspace

LOG2E = 1.4426950408889634
MAX_SPLIT = 32
# Programs per SM that split-KV aims for: one program of 4 warps cannot keep enough
# loads in flight to read its SM's share of the bandwidth.
PROGRAMS_PER_SM = 4
# The fewest tiles a part takes: below it combining the parts costs more than the
# parallelism gains (batch 1 at 8k context read fastest in 16 parts of 4 tiles, against
# 32 parts of 2; H100 2026-12-07, benchmarks/attention_gpu.py).
MIN_PART_TILES = 4


# The block-table width (stride_ts) changes with the longest context on the eager path,
# the workspace offset and the parts with the batch; specializing would recompile.
@triton.jit(do_not_specialize=["stride_ts", "ml_offset", "parts"])
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, lens_ptr, rows_ptr,
                         ws_ptr, cnt_ptr, ml_offset, parts, qk_scale, v_scale,
                         stride_qs, stride_qh, stride_ks, stride_kh, stride_ts,
                         stride_os, stride_oh,
                         G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
                         HAS_ROWS: tl.constexpr, F16: tl.constexpr, SPLIT: tl.constexpr,
                         MIN_TILES: tl.constexpr):
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    ctx = tl.load(lens_ptr + s)
    if SPLIT:
        per = tl.maximum(tl.cdiv(tl.cdiv(ctx, BLOCK_N), parts), MIN_TILES) * BLOCK_N
    else:
        per = tl.maximum(ctx, 1)                             # one part (padding rows: 0)
    used = tl.cdiv(ctx, per)                                 # parts that hold any
    if part < used:
        row = tl.load(rows_ptr + s).to(tl.int64) if HAS_ROWS else s.to(tl.int64)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)   # head_dim padded to a power of two (masked only then)
        heads = kvh * G + g
        gmask = g < G
        if BLOCK_D == D:
            qmask = gmask[:, None]
        else:
            qmask = gmask[:, None] & (d[None, :] < D)
        q = tl.load(q_ptr + row * stride_qs + heads[:, None] * stride_qh + d[None, :],
                    mask=qmask, other=0.0)                               # [BLOCK_G, BLOCK_D]
        if F16:  # an FP8 cache: multiplied in fp16, the queries clamped to its range
            q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        table = tables_ptr + s.to(tl.int64) * stride_ts
        lo = part * per
        for start in range(lo, tl.minimum(lo + per, ctx), BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            valid = pos < ctx
            block = tl.load(table + pos // PAGE, mask=valid, other=0)
            slot = block.to(tl.int64) * PAGE + pos % PAGE
            kv_off = slot[:, None] * stride_ks + kvh * stride_kh + d[None, :]
            if BLOCK_D == D:
                kv_mask = valid[:, None]
            else:
                kv_mask = valid[:, None] & (d[None, :] < D)
            # FP8 caches hold K / k_scale: widened as they are (to fp16: one instruction
            # per pair; to bf16 it takes several and bounds the kernel at about half the
            # bandwidth, measured), the scales applied to the scores and the output.
            k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0).to(q.dtype)
            v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0).to(q.dtype)
            scores = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # log2 units
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))
            p = tl.exp2(scores - m_new[:, None])
            alpha = tl.exp2(m - m_new)
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            m = m_new
        out = out_ptr + row * stride_os + heads[:, None] * stride_oh + d[None, :]
        if not SPLIT:
            tl.store(out, (acc * (v_scale / l)[:, None]).to(out_ptr.dtype.element_ty),
                     mask=qmask)
        elif used == 1:
            tl.store(out, (acc * (v_scale / l)[:, None]).to(out_ptr.dtype.element_ty),
                     mask=qmask)
        else:
            pair = s * tl.num_programs(1) + kvh
            first = pair * parts                          # this pair's parts in the workspace
            acc_at = ws_ptr + g[:, None] * BLOCK_D + d[None, :]
            ml_at = ws_ptr + ml_offset + g
            # Only the group's G rows (BLOCK_G pads them to the dot's 16)
            tl.store(acc_at + (first + part) * BLOCK_G * BLOCK_D, acc, mask=gmask[:, None])
            tl.store(ml_at + (first + part) * 2 * BLOCK_G, m, mask=gmask)
            tl.store(ml_at + (first + part) * 2 * BLOCK_G + BLOCK_G, l, mask=gmask)
            tl.debug_barrier()  # every thread's partial is written before the counter moves
            if tl.atomic_add(cnt_ptr + pair, 1) == used - 1:  # acq_rel: the others' are visible
                m_all = tl.full([BLOCK_G], float("-inf"), tl.float32)
                for i in range(used):
                    m_all = tl.maximum(m_all, tl.load(ml_at + (first + i) * 2 * BLOCK_G,
                                                      mask=gmask, other=0.0,
                                                      cache_modifier=".cg"))
                total = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
                l_all = tl.zeros([BLOCK_G], tl.float32)
                for i in range(used):  # fixed order: the same sum every run
                    w = tl.exp2(tl.load(ml_at + (first + i) * 2 * BLOCK_G, mask=gmask,
                                        other=0.0, cache_modifier=".cg") - m_all)
                    l_all += w * tl.load(ml_at + (first + i) * 2 * BLOCK_G + BLOCK_G,
                                         mask=gmask, other=0.0, cache_modifier=".cg")
                    total += w[:, None] * tl.load(acc_at + (first + i) * BLOCK_G * BLOCK_D,
                                                  mask=gmask[:, None], other=0.0,
                                                  cache_modifier=".cg")
                tl.store(out, (total * (v_scale / l_all)[:, None]).to(
                    out_ptr.dtype.element_ty), mask=qmask)
                tl.store(cnt_ptr + pair, 0)


def _tiles(dtype: torch.dtype, d: int, pairs: int, fp8: bool,
           split: bool = False) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages), from the sweeps of benchmarks/attention_gpu.py
    (results/h200-2026-12-04-attention-*.json, h100-2026-12-07-attention-*.json):
    128-key tiles and 4 warps were best or within 2% for bf16 caches at batch 1-512 and
    for FP8 ones up to 32 sequences, and for split-KV at batch 1; with many programs (8
    KV heads x 256-512 sequences) an FP8 cache reads fastest in 64-key tiles with 2 warps
    (3.2 against 2.5 TB/s). One tile for the split path: each tile choice is a compile.
    float32 (tests) and wide heads need less shared memory."""
    if dtype == torch.float32 or d > 128:
        return 32, 4, 2
    if fp8 and not split and pairs >= 1024:
        return 64, 2, 3
    return 128, 4, 3


def split_for(pairs: int, device: torch.device) -> int:
    """Programs per (sequence, KV head): 1 once the pairs fill the SMs; else enough for
    PROGRAMS_PER_SM on every SM, a power of two up to MAX_SPLIT (parts shrink to no
    fewer than MIN_PART_TILES tiles in the kernel). Measured on the H100 (2026-12-07):
    at 32 sequences x 8 KV heads the unsplit kernel beat 4 parts (2.3 against 2.1 TB/s at
    8k context)."""
    if device.type != "cuda":
        return 1
    sms = multiprocessors(device)
    if pairs >= sms:
        return 1
    return min(MAX_SPLIT, 1 << ((PROGRAMS_PER_SM * sms // pairs).bit_length() - 1))


def paged_decode(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, page: int, scale: float,
                 kv_scales: tuple[float, float] = (1.0, 1.0), out: torch.Tensor | None = None,
                 rows: torch.Tensor | None = None,
                 config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """q: [tokens, heads, d]; the kernel serves one token per entry of block_tables
    ([n, max_blocks] int32) and context_lens ([n] int32, tokens including the new one,
    which is already in the cache): q's row rows[i] (token row i when `rows` is None),
    written to the same row of `out` (a new [n, heads, d] tensor when `out` is None and
    `rows` is too). cache: [2, slots, kv_heads, d]. `config`: (BLOCK_N, num_warps,
    num_stages, split), for the benchmark's sweep. Returns the output tensor."""
    heads, d = q.shape[1], q.shape[2]
    n = context_lens.shape[0]
    kv_heads = cache.shape[2]
    group = heads // kv_heads
    k, v = cache[0], cache[1]
    if out is None:
        out = torch.empty_like(q) if rows is not None else \
            torch.empty(n, heads, d, dtype=q.dtype, device=q.device)
    fp8 = cache.dtype == torch.float8_e4m3fn
    if config is None:
        split = split_for(n * kv_heads, q.device)
        config = (*_tiles(q.dtype, d, n * kv_heads, fp8, split > 1), split)
    block_n, warps, stages, split = config
    block_g = max(16, triton.next_power_of_2(group))
    block_d = triton.next_power_of_2(d)
    acc_floats = n * kv_heads * split * block_g * block_d
    ws, cnt = workspace(q.device, acc_floats + n * kv_heads * split * 2 * block_g,
                        n * kv_heads) if split > 1 else (out, context_lens)
    _paged_decode_kernel[(n, kv_heads, split)](
        q, k, v, out, block_tables, context_lens, rows if rows is not None else context_lens,
        ws, cnt, acc_floats, split, scale * kv_scales[0] * LOG2E, float(kv_scales[1]),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1),
        G=group, BLOCK_G=block_g, D=d, BLOCK_D=block_d, BLOCK_N=block_n, PAGE=page,
        HAS_ROWS=rows is not None, F16=fp8, SPLIT=split > 1, MIN_TILES=MIN_PART_TILES,
        num_warps=warps, num_stages=stages)
    return out
