"""CUDA graphs of the decoder for kernel-only steps (decode and verification steps).

Without graphs a decode step launches every kernel of every layer from Python, and at
small batches the host, not the GPU, sets the pace (about 22 ms a step for the 8B shape,
against 3.6 ms of weight reads). A step whose chunks are all short enough for the paged
decode kernel has a fixed shape once its token count is padded up to one of a few sizes;
each size's forward is captured once and replayed with new inputs copied into its
buffers.

Padding rows write their K/V to a scratch block past the block manager's blocks and
attend only to it, so they touch no sequence's cache. The block-table buffer has room for
the longest context; the kernel reads only the entries a row's context length covers.
"""

from __future__ import annotations

import operator

import numpy as np
import torch

from dwc.constants import graph_sizes
from dwc.runtime.inflight import Feed, InFlight, to_device
from dwc.runtime.model import Batch, DecodeGroup, Decoder



class DecodeGraphs:
    def __init__(self, decoder: Decoder, cache: list[torch.Tensor], block_size: int,
                 max_blocks_per_seq: int, scratch_block: int, max_tokens: int):
        self.decoder = decoder
        self.cache = cache
        self.page = block_size
        self.width = max_blocks_per_seq
        self.scratch = scratch_block
        self.sizes = graph_sizes(max_tokens)
        self.max_tokens = max_tokens
        dev = cache[0].device
        n = self.max_tokens
        # ids, positions and slots are rows of one buffer, so one copy fills them; its
        # last column takes the writes of a step's unused feed entries (step_table).
        self.inputs = torch.zeros(3, n + 1, dtype=torch.long, device=dev)
        self.ids, self.positions, self.slots = self.inputs[0], self.inputs[1], self.inputs[2]
        self.tables = torch.zeros(n, self.width, dtype=torch.int32, device=dev)
        self.lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.rows = torch.arange(n, device=dev)
        self.pinned = dev.type == "cuda"
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.tapped: dict[int, torch.Tensor] = {}  # size -> the decoder's tapped layers
        # The last step's sequences and positions when it was decode rows only (advance).
        self.last: tuple[list, np.ndarray] | None = None

    def capture(self) -> None:
        """Capture every size, largest first, sharing one memory pool."""
        self._pad_from(0)
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            self._forward(size)  # warm-up outside the graph: Triton compiles, cuBLAS plans
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self._forward(size)
            if self.decoder.taps:  # made inside the graph: its replays refill it
                self.tapped[size] = self.decoder.tapped
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def _forward(self, n: int) -> torch.Tensor:
        batch = Batch(self.ids[:n], self.positions[:n], self.slots[:n], [], self.rows[:n],
                      DecodeGroup(None, self.tables[:n], self.lens[:n], self.page))
        return self.decoder.forward(batch, self.cache)

    def _pad_from(self, n: int, end: int | None = None) -> None:
        """Rows n..end (default: all after n) become padding: the scratch block's first
        slot, context 1."""
        self.slots[n:end] = self.scratch * self.page
        self.tables[n:end, 0] = self.scratch
        self.lens[n:end] = 1

    def fits(self, tokens: int) -> bool:
        return tokens <= self.max_tokens

    def _replay(self, size: int, n: int) -> None:
        """Replay `size`; an EAGLE head's tapped layers of the n real rows are then the
        decoder's (valid, like the logits, until the next replay)."""
        self.graphs[size].replay()
        if size in self.tapped:
            self.decoder.tapped = self.tapped[size][:n]

    def run(self, ids: list[int], positions: list[int], slots: list[int],
            tables: list[list[int]], lens: list[int], rows: list[int],
            feed: Feed | None = None) -> torch.Tensor:
        """One step of len(ids) tokens (one kernel row each); logits of `rows`. `feed`
        fills in pending input ids from the device (asynchronous scheduling). Every
        input, the padding rows and the feed's indices go through one pinned host table
        and one copy, queued behind the GPU's work; the host's work per step is a few
        launches (issue 18: host time per step)."""
        n = len(ids)
        size = next(s for s in self.sizes if s >= n)
        table = step_table(ids, positions, slots, tables, lens, size, self.scratch, self.page,
                           feed, self.max_tokens)
        host = torch.from_numpy(table)
        dev = host.pin_memory().to(self.ids.device, non_blocking=True) if self.pinned else host
        width = table.shape[0] - FIRST_TABLE_ROW
        self.inputs[:, :size].copy_(dev[:3])
        self.lens[:size].copy_(dev[3])
        self.tables[:size, :width].copy_(dev[FIRST_TABLE_ROW:].T)
        if feed is not None:
            self.ids.index_put_((dev[4],), feed.tokens[dev[5]])
        self._replay(size, n)
        out = self.outputs[size]
        # Rows are increasing: as many as the tokens means every row (a decode step),
        # a view then. It is valid until the next replay of any size (the sizes share
        # one memory pool); every caller reads it first (one stream keeps the order).
        return out[:n] if len(rows) == n else out[to_device(rows, self.ids.device)]


    # -- a decode step that continues the last one (issue 18: host time per step) -------

    def remember(self, chunks) -> None:
        """After a step through `run`: keep its sequences and positions when every chunk
        was one decode row returning logits, so the next step may `advance`."""
        self.last = None
        if decode_rows(chunks):
            self.last = (list(map(_seq, chunks)), np.array(list(map(_start, chunks))))

    def advance(self, chunks, flight: InFlight) -> torch.Tensor | None:
        """The step after a decode step of the same sequences in the same order, less
        any that finished or were preempted, each one position on (the common case at
        steady state): every row's input is the token the step in flight sampled for
        its sequence (`flight`, launched by this runner's last step), so its inputs are
        the last step's rows advanced (and, when rows left, gathered) on the device,
        with no per-row lists on the host; a block table changes only where a row
        enters a block. None (nothing done) when the step is not such a step."""
        last, self.last = self.last, None
        if last is None or not decode_rows(chunks) or flight.seqs != last[0]:
            return None
        # Sequences compare by identity (Sequence has eq=False): C-level list compares.
        seqs, n = list(map(_seq, chunks)), len(chunks)
        kept = None if seqs == last[0] else kept_rows(seqs, last[0])
        if kept == []:
            return None  # not the same sequences in the same order
        starts = np.array(list(map(_start, chunks)))
        if not np.array_equal(starts, (last[1] if kept is None else last[1][kept]) + 1):
            return None
        # Within a block a row's next slot is its last one plus one; positions and slots
        # are rows 1 and 2 of `inputs`, so one add moves both (few launches: each costs
        # the host about 10 us on a GPU machine).
        if kept is None:
            self.inputs[1:, :n] += 1
            self.lens[:n] += 1
            self.ids[:n].copy_(flight.tokens)
        else:  # rows of sequences that left: the others move up, their rows pad
            rows = to_device(kept, self.ids.device)
            self.inputs[1:, :n] = self.inputs[1:, rows] + 1
            self.lens[:n] = self.lens[rows] + 1
            self.tables[:n] = self.tables[rows]
            self.ids[:n] = flight.tokens[rows]
            self.positions[n:len(last[0])] = 0
            self._pad_from(n, len(last[0]))
        page = self.page
        entering = np.flatnonzero(starts % page == 0).tolist()  # rows entering a block
        if entering:  # its new block's id in the table, its slot the block's first
            cols = [int(starts[i]) // page for i in entering]
            ids = [seqs[i].block_table[j] for i, j in zip(entering, cols)]
            update = to_device(entering + cols + ids + [b * page for b in ids],
                               self.ids.device).view(4, -1)
            self.tables[update[0], update[1]] = update[2].to(self.tables.dtype)
            self.slots[update[0]] = update[3]
        size = next(s for s in self.sizes if s >= n)
        self._replay(size, n)
        self.last = (seqs, starts)
        return self.outputs[size][:n]


def kept_rows(seqs: list, last: list) -> list[int]:
    """The rows of `last` that `seqs` are, when `seqs` is `last` with some left out and
    the order kept; else [] (an empty step is never advanced)."""
    rows, j, n = [], 0, len(last)
    for seq in seqs:
        while j < n and last[j] is not seq:
            j += 1
        if j == n:
            return []
        rows.append(j)
        j += 1
    return rows


_seq, _start = operator.attrgetter("seq"), operator.attrgetter("start")
_length, _logits = operator.attrgetter("length"), operator.attrgetter("logits")


def decode_rows(chunks) -> bool:
    """Whether every chunk is one decode row returning its logits. A chunk has at least
    one token and at most that many logits, so the sums say it without a Python loop."""
    n = len(chunks)
    return sum(map(_length, chunks)) == n and sum(map(_logits, chunks)) == n


FIRST_TABLE_ROW = 6  # step_table's rows: ids, positions, slots, lens, feed dst, feed src


def step_table(ids, positions, slots, tables, lens, size: int, scratch: int, page: int,
               feed: Feed | None, dummy: int) -> np.ndarray:
    """A graph step's inputs as one int64 array of `size` columns (the captured size):
    ids, positions, slots, context lengths, the feed's destination and source rows, then
    the block tables transposed. Columns past the step's tokens are padding rows: the
    scratch block's first slot, context 1. Feed entries past the feed's length write
    column `dummy` of the ids buffer, which no graph reads."""
    n = len(ids)
    width = max(map(len, tables))  # the kernel reads no entry past a row's context
    padded = [t if len(t) == width else t + [0] * (width - len(t)) for t in tables]
    table = np.zeros((FIRST_TABLE_ROW + width, size), dtype=np.int64)
    table[:4, :n] = (ids, positions, slots, lens)
    table[FIRST_TABLE_ROW:, :n] = np.array(padded, dtype=np.int64).T  # one conversion
    table[2, n:] = scratch * page
    table[3, n:] = 1
    table[FIRST_TABLE_ROW, n:] = scratch
    table[4] = dummy
    if feed is not None:
        table[4, :len(feed.dst)] = feed.dst
        table[5, :len(feed.src)] = feed.src
    return table
