"""The host-memory tier under the prefix cache (docs/RUNTIME.md, "Host-memory KV tier").

When the block manager reuses a free block that still holds a cached prefix block, that
block's K/V go to a bounded pool in host memory (pinned when the cache is on a GPU) under
the block's key; a later request whose prefix misses the device cache but hits the pool
gets a device block back with a copy, instead of recomputing that part of the prefill.

The copies are issued on the device's current stream without waiting (non_blocking from
and into pinned memory): a copy out is ordered before the kernels that later overwrite
the block, a copy in before the kernels that read it, and a pool slot reused for another
block is written after every earlier copy out of it, all by stream order, so the host
never waits and no event is needed. The pool is inclusive: a restored block stays in it
(a second eviction of the same content costs no copy) and the least recently used entry
makes room when it is full. Every model's cache is copied (the target's and a draft's:
their blocks are shared), all layers.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class TierStats:
    saved: int = 0          # blocks copied to host memory
    restored: int = 0       # blocks copied back for a prefix hit
    evicted: int = 0        # host entries dropped to make room (least recently used)
    hit_tokens: int = 0     # prompt tokens served from host memory
    bytes_out: int = 0
    bytes_in: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class HostTier:
    def __init__(self, caches: list[torch.Tensor], block_size: int, capacity_blocks: int):
        """`caches`: every layer's cache tensor of every model ([2, slots, kv_heads, d])."""
        if capacity_blocks < 1:
            raise ValueError("a host tier needs room for at least one block")
        self.caches = caches
        self.block_size = block_size
        pin = caches[0].is_cuda
        self.pools = [torch.empty((capacity_blocks, 2, block_size, *c.shape[2:]), dtype=c.dtype,
                                  pin_memory=pin) for c in caches]
        self.block_bytes = block_bytes(caches, block_size)
        self.capacity = capacity_blocks
        self.entries: OrderedDict[tuple, tuple[int, int]] = OrderedDict()  # key -> (slot, key_id)
        self.free_slots = list(range(capacity_blocks - 1, -1, -1))
        self.stats = TierStats()

    def __len__(self) -> int:
        return len(self.entries)

    def save(self, block_id: int, key: tuple, key_id: int) -> None:
        """Copy a device block that is about to be reused into the pool (once per key)."""
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        if not self.free_slots:
            _, (slot, _) = self.entries.popitem(last=False)
            self.free_slots.append(slot)
            self.stats.evicted += 1
        slot = self.free_slots.pop()
        start = block_id * self.block_size
        for pool, cache in zip(self.pools, self.caches):
            pool[slot].copy_(cache[:, start:start + self.block_size], non_blocking=True)
        self.entries[key] = (slot, key_id)
        self.stats.saved += 1
        self.stats.bytes_out += self.block_bytes

    def restore(self, key: tuple, block_id: int) -> int | None:
        """Copy the pool's block for `key` into device block `block_id`; returns the key's
        id (the device block takes it, so its children's keys still match), or None when
        the pool does not hold the key."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        slot, key_id = entry
        start = block_id * self.block_size
        for pool, cache in zip(self.pools, self.caches):
            cache[:, start:start + self.block_size].copy_(pool[slot], non_blocking=True)
        self.entries.move_to_end(key)
        self.stats.restored += 1
        self.stats.hit_tokens += self.block_size
        self.stats.bytes_in += self.block_bytes
        return key_id

    def touch(self, key: tuple) -> bool:
        """Whether the pool holds `key`, which becomes its most recently used entry (so
        the copy out that taking a device block for it may cause cannot evict it)."""
        if key not in self.entries:
            return False
        self.entries.move_to_end(key)
        return True


def block_bytes(caches: list[torch.Tensor], block_size: int) -> int:
    """Bytes of one block over all the caches: K and V, all layers."""
    return sum(2 * block_size * c.shape[2] * c.shape[3] * c.element_size() for c in caches)


def capacity_for(gib: float, caches: list[torch.Tensor], block_size: int) -> int:
    return int(gib * (1 << 30)) // block_bytes(caches, block_size)


def make_tier(gib: float, runners: list, block_size: int, tensor_parallel: int) -> HostTier:
    """The engine's tier of `gib` GiB over its runners' caches (the target's, a draft's)."""
    from dwc.errors import BadInput

    if tensor_parallel > 1:
        raise BadInput(f"kv_host_gib {gib}: the host tier needs the whole cache in one "
                       f"process; not with tensor_parallel {tensor_parallel}")
    caches = [c for r in runners for c in r.cache]
    capacity = capacity_for(gib, caches, block_size)
    if capacity < 1:
        raise BadInput(f"kv_host_gib {gib}: less than one block "
                       f"({block_bytes(caches, block_size)} bytes)")
    return HostTier(caches, block_size, capacity)
