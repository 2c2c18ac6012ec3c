"""The host-memory tier under the prefix cache (docs/RUNTIME.md, "Host-memory KV tier").

When the block manager reuses a free block that still holds a cached prefix block, that
block's K/V go to a bounded pool in host memory (pinned when the cache is on a GPU) under
the block's key; a later request whose prefix misses the device cache but hits the pool
gets a device block back with a copy, instead of recomputing that part of the prefill.

The block manager's calls only do the bookkeeping and queue the copy; the engine calls
`flush` once a step, after scheduling and before launching, which moves the queued blocks
in batches: a pool slot holds one block of every cache side by side (one row of bytes),
so a block crosses the bus in one copy (or one per run of adjacent slots), and a batch is
gathered from (scattered into) each cache with one indexing kernel, instead of a copy per
block and layer (an 8k-token context of a 32-layer model is 512 blocks: about 33,000
copies, whose host time alone would rival recomputing the prefill).

Copies out run on a side stream so that the step's kernels do not wait for the bus: the
main stream gathers a batch into one of a ring of device buffers (its kernels may then
overwrite the blocks), and the side stream, after an event, copies the buffer to the pool;
a buffer is gathered into again only after the side stream's event for its last copy.
Copies in run on the main stream (the step reads them next), after the side stream's
events for any pending copy out into the same slots. Nothing makes the host wait. Within a
flush every copy out is issued before any copy in; the two orders differ only where a
copy out reads a block a queued copy in writes or writes a slot a queued copy in reads,
and `save` flushes first in those cases. The pool is inclusive: a restored block stays in
it (a second eviction of the same content costs no copy) and the least recently used
entry makes room when it is full. Every model's cache is copied (the target's and a
draft's: their blocks are shared), all layers.
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass

import torch

from dwc.runtime.inflight import to_device

BATCH_BYTES = 64 << 20    # a batch of blocks passes through a device buffer this big
RING = 4                  # buffers for copies out (the side stream drains them)
STAGING_BYTES = (RING + 1) * BATCH_BYTES  # the ring and the buffer for copies in
ALIGN = 16                # each cache's bytes start aligned within a pool row (copies)


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
        if capacity_blocks < 2:
            # `_from_tier` makes the hit its most recent entry, then takes a device block
            # whose copy out evicts the least recent: with one slot that is the hit itself.
            raise ValueError("a host tier needs room for at least two blocks")
        self.caches = caches
        self.block_size = block_size
        self.offsets, self.row_bytes = _row_layout(caches, block_size)
        self.block_bytes = block_bytes(caches, block_size)
        self.pool, registered = _pool(capacity_blocks, self.row_bytes, caches[0].is_cuda)
        if registered:  # unlocked when the tier goes (the finalizer keeps the pool till then)
            weakref.finalize(self, _unregister, self.pool)
        self.capacity = capacity_blocks
        self.batch_rows = max(1, BATCH_BYTES // self.row_bytes)
        self.buffers: list[torch.Tensor] = []     # RING for copies out, one for copies in
        self.side = torch.cuda.Stream(caches[0].device) if caches[0].is_cuda else None
        self.ring_free: list = [None] * RING       # side-stream event: buffer i drained
        self.out_pending: deque = deque()         # (event, slots) of copies out in flight
        self.num_out_batches = 0
        self.entries: OrderedDict[tuple, tuple[int, int]] = OrderedDict()  # key -> (slot, key_id)
        self.free_slots = list(range(capacity_blocks - 1, -1, -1))
        self.outs: list[tuple[int, int]] = []    # queued (device block, slot) copies out
        self.ins: list[tuple[int, int]] = []     # queued (slot, device block) copies in
        self.in_blocks: set[int] = set()
        self.in_slots: set[int] = set()
        self.stats = TierStats()

    def __len__(self) -> int:
        return len(self.entries)

    def save(self, block_id: int, key: tuple, key_id: int) -> None:
        """Queue a copy of a device block that is about to be reused into the pool (once
        per key)."""
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        if block_id in self.in_blocks or (not self.free_slots and
                                          self.entries[next(iter(self.entries))][0]
                                          in self.in_slots):
            self.flush()  # this copy out must follow a queued copy in (module docstring)
        if not self.free_slots:
            _, (slot, _) = self.entries.popitem(last=False)
            self.free_slots.append(slot)
            self.stats.evicted += 1
        slot = self.free_slots.pop()
        self.outs.append((block_id, slot))
        self.entries[key] = (slot, key_id)
        self.stats.saved += 1
        self.stats.bytes_out += self.block_bytes

    def restore(self, key: tuple, block_id: int) -> int | None:
        """Queue a copy of the pool's block for `key` into device block `block_id`;
        returns the key's id (the device block takes it, so its children's keys still
        match), or None when the pool does not hold the key."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        slot, key_id = entry
        if block_id in self.in_blocks:
            self.flush()  # two copies into one block in one batch would race
        self.ins.append((slot, block_id))
        self.in_blocks.add(block_id)
        self.in_slots.add(slot)
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

    def flush(self) -> None:
        """Issue the queued copies: every copy out, then every copy in, in batches."""
        outs, ins, self.outs, self.ins = self.outs, self.ins, [], []
        self.in_blocks.clear()
        self.in_slots.clear()
        while self.out_pending and self.out_pending[0][0].query():
            self.out_pending.popleft()  # copies out that have landed need no wait
        for i in range(0, len(outs), self.batch_rows):
            self._copy_out(outs[i:i + self.batch_rows])
        for i in range(0, len(ins), self.batch_rows):
            self._copy_in(ins[i:i + self.batch_rows])

    # -- the copies ---------------------------------------------------------------------

    def _copy_out(self, batch: list[tuple[int, int]]) -> None:
        j = self.num_out_batches % RING
        self.num_out_batches += 1
        main = torch.cuda.current_stream(self.side.device) if self.side else None
        if self.ring_free[j] is not None:
            main.wait_event(self.ring_free[j])  # its last copy out has left the buffer
        rows = self._buffer(j)[:len(batch)]
        ids = self._index([b for b, _ in batch])
        for cache, view in zip(self.caches, self._views(rows)):
            view.copy_(_blocks(cache, self.block_size).index_select(1, ids).transpose(0, 1))
        slots = [s for _, s in batch]
        if self.side is None:
            self._to_pool(rows, slots)
            return
        self.side.wait_event(main.record_event())
        with torch.cuda.stream(self.side):
            self._to_pool(rows, slots)
        self.ring_free[j] = self.side.record_event()
        self.out_pending.append((self.ring_free[j], set(slots)))

    def _to_pool(self, rows: torch.Tensor, slots: list[int]) -> None:
        for row, slot, n in _runs(slots):
            self.pool[slot:slot + n].copy_(rows[row:row + n], non_blocking=True)

    def _copy_in(self, batch: list[tuple[int, int]]) -> None:
        slots = [s for s, _ in batch]
        if self.side is not None:
            self._after_copies_out(set(slots))
        rows = self._buffer(RING)[:len(batch)]
        for row, slot, n in _runs(slots):
            rows[row:row + n].copy_(self.pool[slot:slot + n], non_blocking=True)
        ids = self._index([b for _, b in batch])
        for cache, view in zip(self.caches, self._views(rows)):
            _blocks(cache, self.block_size).index_copy_(1, ids, view.transpose(0, 1))

    def _after_copies_out(self, slots: set[int]) -> None:
        """Make the main stream wait for the copies out still in flight into `slots`."""
        main = torch.cuda.current_stream(self.side.device)
        for event, written in self.out_pending:
            if written & slots:
                main.wait_event(event)

    def _buffer(self, i: int) -> torch.Tensor:
        """Staging buffer i (RING: the one for copies in), made at first use."""
        while len(self.buffers) <= i:
            self.buffers.append(torch.empty((self.batch_rows, self.row_bytes),
                                            dtype=torch.uint8, device=self.caches[0].device))
        return self.buffers[i]

    def _index(self, block_ids: list[int]) -> torch.Tensor:
        return to_device(block_ids, self.caches[0].device)

    def _views(self, rows: torch.Tensor):
        """Each cache's part of the staging rows as bytes [n, 2, block_size, kv_heads,
        d * itemsize]."""
        n = rows.shape[0]
        for cache, start in zip(self.caches, self.offsets):
            shape = (2, self.block_size, cache.shape[2], cache.shape[3] * cache.element_size())
            yield rows[:, start:start + math.prod(shape)].view(n, *shape)


def _pool(rows: int, row_bytes: int, pin: bool) -> tuple[torch.Tensor, bool]:
    """The host pool, page-locked on a GPU machine so that copies are asynchronous, and
    whether it was registered with CUDA: registering a plain tensor locks exactly its
    size, where PyTorch's pinned allocator rounds a request up to a power of two (a
    40 GiB tier would lock 64 GiB). That allocator is the fallback."""
    pool = torch.empty((rows, row_bytes), dtype=torch.uint8)
    if not pin:
        return pool, False
    if int(torch.cuda.cudart().cudaHostRegister(pool.data_ptr(), pool.numel(), 0)) == 0:
        if pool.is_pinned():
            return pool, True
        _unregister(pool)
    return torch.empty((rows, row_bytes), dtype=torch.uint8, pin_memory=True), False


def _unregister(pool: torch.Tensor) -> None:
    try:
        torch.cuda.synchronize()  # no copy may still be on its way into or out of the pool
        torch.cuda.cudart().cudaHostUnregister(pool.data_ptr())
    except Exception:  # noqa: BLE001 - at interpreter exit CUDA may be gone: nothing to undo
        pass


def _blocks(cache: torch.Tensor, block_size: int) -> torch.Tensor:
    """A cache [2, slots, kv_heads, d] as bytes [2, blocks, block_size, kv_heads,
    d * itemsize] (indexing kernels exist for bytes whatever the cache's dtype, FP8
    included)."""
    raw = cache.view(torch.uint8)
    return raw.view(2, -1, block_size, *raw.shape[2:])


def _runs(slots: list[int]):
    """(first row, first slot, length) of each run of consecutive slots, in order."""
    row = 0
    while row < len(slots):
        n = 1
        while row + n < len(slots) and slots[row + n] == slots[row] + n:
            n += 1
        yield row, slots[row], n
        row += n


def _row_layout(caches: list[torch.Tensor], block_size: int) -> tuple[list[int], int]:
    """Where each cache's block starts within a pool row, and the row's bytes (each start
    aligned to ALIGN bytes, for the copies)."""
    offsets, end = [], 0
    for c in caches:
        offsets.append(end)
        end += -(-2 * block_size * c.shape[2] * c.shape[3] * c.element_size() // ALIGN) * ALIGN
    return offsets, end


def block_bytes(caches: list[torch.Tensor], block_size: int) -> int:
    """Bytes of one block over all the caches: K and V, all layers."""
    return sum(2 * block_size * c.shape[2] * c.shape[3] * c.element_size() for c in caches)


def capacity_for(gib: float, caches: list[torch.Tensor], block_size: int) -> int:
    return int(gib * (1 << 30)) // _row_layout(caches, block_size)[1]


def make_tier(gib: float, runners: list, block_size: int, tensor_parallel: int) -> HostTier:
    """The engine's tier of `gib` GiB over its runners' caches (the target's, a draft's)."""
    from dwc.errors import BadInput

    if tensor_parallel > 1:
        raise BadInput(f"kv_host_gib {gib}: the host tier needs the whole cache in one "
                       f"process; not with tensor_parallel {tensor_parallel}")
    caches = [c for r in runners for c in r.cache]
    capacity = capacity_for(gib, caches, block_size)
    if capacity < 2:
        raise BadInput(f"kv_host_gib {gib}: less than two blocks "
                       f"({block_bytes(caches, block_size)} bytes each)")
    return HostTier(caches, block_size, capacity)
