"""The paged KV cache's bookkeeping: fixed-size blocks, reference counts, prefix caching.

Each full block gets a key chained from its parent block and its own token ids (as vLLM
does), so equal prefixes map to equal blocks. The key is exact, not a hash: (the parent's
unique id, the block's token ids), looked up in a dict, so two different prefixes can
never share KV (a hash collision there would leak one request's context into another's). A block whose reference count drops
to zero goes to the back of the free list but keeps its hash: a later sequence with the
same prefix takes it back without recomputing; a new allocation takes the oldest free block
and evicts its hash (least recently freed first): with a host tier (host_tier.py), the
evicted block's K/V are copied to host memory first, and a prefix that misses here but
hits there is copied back into a free block.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

from dwc.runtime.sequence import Sequence


class Block:
    __slots__ = ("id", "ref_count", "key", "key_id")

    def __init__(self, block_id: int):
        self.id = block_id
        self.ref_count = 0
        self.key: tuple | None = None    # (parent's key_id, token ids) once sealed
        self.key_id: int | None = None   # unique per sealing; children's keys name it


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.by_key: dict[tuple, int] = {}
        self._key_ids = itertools.count()
        self.hits = 0       # prompt tokens served from the prefix cache (host tier included)
        self.lookups = 0    # prompt tokens looked up
        self.tier = None    # a HostTier, set by the engine when one is configured

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
        if block.key is not None and self.by_key.get(block.key) == block_id:
            if self.tier is not None:
                self.tier.save(block_id, block.key, block.key_id)
            del self.by_key[block.key]  # evict the cached prefix it held
        block.key, block.key_id, block.ref_count = None, None, 1
        return block_id

    def match_prefix(self, seq: Sequence) -> None:
        """Reuse cached blocks for the longest cached prefix of a fresh sequence's tokens.

        At least one token is left to compute, so the step still yields logits."""
        assert not seq.block_table and seq.num_computed == 0
        if seq.params.prompt_logprobs is not None and \
                len(seq.prompt_logprobs) < len(seq.prompt_ids) - 1:
            return  # it needs every prompt position's logits; cached blocks hold only K/V
        tokens = seq.tokens
        parent = None
        usable = (len(tokens) - 1) // self.block_size
        self.lookups += len(seq.prompt_ids)
        for i in range(usable):
            chunk = tuple(tokens[i * self.block_size:(i + 1) * self.block_size])
            block_id = self.by_key.get((parent, chunk))
            if block_id is None:
                block_id = self._from_tier((parent, chunk))
                if block_id is None:
                    break
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            parent = block.key_id
        seq.num_computed = seq.num_cached = len(seq.block_table) * self.block_size
        seq.num_sealed = len(seq.block_table)
        self.hits += min(seq.num_cached, len(seq.prompt_ids))

    def _from_tier(self, key: tuple) -> int | None:
        """A free block holding the host tier's copy of `key` (ref_count 0, still in the
        free list, the caller takes it as a cached block), or None."""
        if self.tier is None or not self.free or not self.tier.touch(key):
            return None
        block_id = self._take_free()  # may send another cached block to the tier
        block = self.blocks[block_id]
        block.key, block.key_id = key, self.tier.restore(key, block_id)
        block.ref_count = 0
        self.by_key[key] = block_id
        self.free[block_id] = None
        return block_id

    def seal_full_blocks(self, seq: Sequence, computed: int | None = None) -> None:
        """Register the key of every block whose `computed` first tokens (default: the
        sequence's num_computed) are all in the cache. Blocks before seq.num_sealed
        already have theirs (a block in use keeps its key), so a decode step that fills
        no block costs nothing here."""
        computed = seq.num_computed if computed is None else computed
        full = min(computed // self.block_size, len(seq.block_table))
        if full <= seq.num_sealed:
            return
        tokens = seq.tokens
        start = seq.num_sealed
        parent = self.blocks[seq.block_table[start - 1]].key_id if start else None
        for i in range(start, full):
            end = (i + 1) * self.block_size
            block = self.blocks[seq.block_table[i]]
            if block.key is None:
                block.key = (parent, tuple(tokens[end - self.block_size:end]))
                block.key_id = next(self._key_ids)
                self.by_key.setdefault(block.key, seq.block_table[i])
            parent = block.key_id
        seq.num_sealed = full

    def trim(self, seq: Sequence, total_tokens: int) -> None:
        """Free the blocks past those `total_tokens` tokens need: after a verification
        step, the slots reserved for draft tokens the target rejected (they were never
        sealed, so no cached prefix is lost)."""
        keep = -(-total_tokens // self.block_size)
        for block_id in seq.block_table[keep:]:
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count == 0 and block.key is None, f"block {block_id} is shared"
            self.free[block_id] = None
            self.free.move_to_end(block_id, last=False)  # empty: the first to reuse
        del seq.block_table[keep:]
        seq.num_sealed = min(seq.num_sealed, keep)

    def release(self, seq: Sequence) -> None:
        """Drop `seq`'s references; blocks nobody uses go to the free list, hashes kept."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} released twice"
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_sealed = 0

    def slot(self, seq: Sequence, position: int) -> int:
        """Flat cache slot (block * block_size + offset) of a token position of `seq`."""
        return seq.block_table[position // self.block_size] * self.block_size + \
            position % self.block_size
