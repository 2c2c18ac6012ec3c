"""The paged KV cache's bookkeeping: fixed-size blocks, reference counts, prefix caching.

Each full block gets a hash chained from its parent block's hash and its own token ids
(as vLLM does), so equal prefixes map to equal blocks. A block whose reference count drops
to zero goes to the back of the free list but keeps its hash: a later sequence with the
same prefix takes it back without recomputing; a new allocation takes the oldest free block
and evicts its hash (least recently freed first).
"""

from __future__ import annotations

from collections import OrderedDict

from dwc.runtime.sequence import Sequence


class Block:
    __slots__ = ("id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.by_hash: dict[int, int] = {}
        self.hits = 0       # prompt tokens served from the prefix cache
        self.lookups = 0    # prompt tokens looked up

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_needed(self, seq: Sequence, total_tokens: int) -> int:
        return max(0, -(-total_tokens // self.block_size) - len(seq.block_table))

    def can_grow(self, seq: Sequence, total_tokens: int) -> bool:
        return self.blocks_needed(seq, total_tokens) <= self.num_free

    def grow(self, seq: Sequence, total_tokens: int) -> None:
        """Give `seq` enough blocks to hold `total_tokens` tokens."""
        for _ in range(self.blocks_needed(seq, total_tokens)):
            seq.block_table.append(self._take_free())

    def _take_free(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.by_hash.get(block.hash) == block_id:
            del self.by_hash[block.hash]  # evict the cached prefix it held
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block_id

    def match_prefix(self, seq: Sequence) -> None:
        """Reuse cached blocks for the longest cached prefix of a fresh sequence's tokens.

        At least one token is left to compute, so the step still yields logits."""
        assert not seq.block_table and seq.num_computed == 0
        tokens = seq.tokens
        parent = None
        usable = (len(tokens) - 1) // self.block_size
        self.lookups += len(seq.prompt_ids)
        for i in range(usable):
            chunk = tuple(tokens[i * self.block_size:(i + 1) * self.block_size])
            h = hash((parent, chunk))
            block_id = self.by_hash.get(h)
            if block_id is None or self.blocks[block_id].token_ids != chunk:
                break
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            parent = h
        seq.num_computed = seq.num_cached = len(seq.block_table) * self.block_size
        self.hits += min(seq.num_cached, len(seq.prompt_ids))

    def seal_full_blocks(self, seq: Sequence) -> None:
        """Register the hash of every block `seq` has completely computed."""
        tokens = seq.tokens
        parent = None
        for i, block_id in enumerate(seq.block_table):
            end = (i + 1) * self.block_size
            if end > seq.num_computed:
                break
            block = self.blocks[block_id]
            if block.hash is None:
                block.token_ids = tuple(tokens[end - self.block_size:end])
                block.hash = hash((parent, block.token_ids))
                self.by_hash.setdefault(block.hash, block_id)
            parent = block.hash

    def release(self, seq: Sequence) -> None:
        """Drop `seq`'s references; blocks nobody uses go to the free list, hashes kept."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} released twice"
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []

    def slot(self, seq: Sequence, position: int) -> int:
        """Flat cache slot (block * block_size + offset) of a token position of `seq`."""
        return seq.block_table[position // self.block_size] * self.block_size + \
            position % self.block_size
