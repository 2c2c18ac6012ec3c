"""The paged prefill kernel's inputs (paged_prefill_triton.py): the step's prompt chunks
as it reads them and how they are cut into programs; plain Python, so that the host side
runs and is tested without a GPU."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PrefillGroup:
    """The GPU's prompt chunks (longer than KERNEL_MAX_CHUNK, from any position) as the
    paged prefill kernel reads them (kernels/paged_prefill_triton.py)."""

    tiles: torch.Tensor            # [tiles, 2] int32: chunk index, first query in it
    chunks: torch.Tensor           # [chunks, 3] int32: token row, length, start position
    block_tables: torch.Tensor     # [chunks, max_blocks] int32
    page: int                      # block size
    block_q: int                   # queries per tile the table was cut for


def block_q_for(dtype: torch.dtype, head_dim: int, group: int) -> int:
    """Queries per program. A program's rows are its queries times the query heads that
    share a KV head (`group`, rounded up to a power of two): 128 rows fill Hopper's tensor
    cores for bf16 at head_dim <= 128; float32 (tests) and wider heads need less shared
    memory."""
    rows = 32 if dtype == torch.float32 else 128 if head_dim <= 128 else 64
    return max(1, rows // (1 << (group - 1).bit_length()))


def tile_table(chunks: list[tuple[int, int, int]], block_q: int) -> list[list[int]]:
    """[chunk index, first query] per program for chunks of (token row, length, start),
    the tiles that see the most keys (the last tiles of long contexts) first, so that
    short ones fill the end of the launch."""
    tiles = [[c, m] for c, (_, n, _) in enumerate(chunks) for m in range(0, n, block_q)]
    tiles.sort(key=lambda t: -(chunks[t[0]][2] + t[1]))
    return tiles
