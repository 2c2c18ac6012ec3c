"""The decode graphs' inputs (cuda_graphs.py): one host table per step fills the captured
buffers, the padding rows and the pending ids. The replay itself needs a GPU
(tests/test_gpu.py compares graph and eager outputs there); here the buffers it reads are
checked on the CPU with the replay replaced."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from dwc.runtime.cuda_graphs import DecodeGraphs, step_table
from dwc.runtime.inflight import Feed, InFlight
from dwc.runtime.model_runner import ModelRunner
from dwc.runtime.scheduler import PENDING, Chunk
from dwc.runtime.sequence import SamplingParams, Sequence

PAGE, SCRATCH, MAX_TOKENS, WIDTH = 16, 99, 8, 6


class Replay:
    def __init__(self):
        self.count = 0

    def replay(self):
        self.count += 1


def graphs() -> DecodeGraphs:
    cache = [torch.zeros(1)]
    g = DecodeGraphs(decoder=None, cache=cache, block_size=PAGE, max_blocks_per_seq=WIDTH,
                     scratch_block=SCRATCH, max_tokens=MAX_TOKENS)
    g._pad_from(0)
    for size in g.sizes:
        g.graphs[size] = Replay()
        g.outputs[size] = torch.arange(size * 3, dtype=torch.float32).view(size, 3)
    return g


def test_step_fills_buffers_pads_and_feeds():
    g = graphs()
    tokens = torch.tensor([70, 71, 72])  # the step in flight's samples
    feed = Feed(dst=[0, 2], src=[2, 0], tokens=tokens)
    tables = [[3, 4], [5], [6, 7, 8]]
    out = g.run([PENDING, 11, PENDING], [20, 5, 40], [4 * PAGE + 4, 5 * PAGE + 5, 8 * PAGE + 8],
                tables, [21, 6, 41], [0, 1, 2], feed=feed)
    size = next(s for s in g.sizes if s >= 3)
    assert g.ids[:3].tolist() == [72, 11, 70]
    assert g.positions[:3].tolist() == [20, 5, 40]
    assert g.lens[:3].tolist() == [21, 6, 41]
    assert g.tables[:3, :3].tolist() == [[3, 4, 0], [5, 0, 0], [6, 7, 8]]
    # Padding rows touch only the scratch block.
    assert g.slots[3:size].tolist() == [SCRATCH * PAGE] * (size - 3)
    assert g.lens[3:size].tolist() == [1] * (size - 3)
    assert g.tables[3:size, 0].tolist() == [SCRATCH] * (size - 3)
    assert g.graphs[size].count == 1
    assert torch.equal(out, g.outputs[size][:3])


def test_a_later_smaller_step_repads_and_picks_rows():
    g = graphs()
    g.run([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [[1]] * 5, [2, 3, 4, 5, 6],
          list(range(5)))
    out = g.run([7, 8], [9, 10], [33, 34], [[2], [2]], [10, 11], [1])
    size = next(s for s in g.sizes if s >= 2)
    assert g.ids[:2].tolist() == [7, 8]
    assert g.slots[2:size].tolist() == [SCRATCH * PAGE] * (size - 2)
    assert torch.equal(out, g.outputs[size][[1]])


def test_table_layout_and_unused_feed_entries():
    t = step_table([PENDING, 5], [3, 4], [6, 7], [[1, 2], [3]], [4, 5], size=4,
                   scratch=SCRATCH, page=PAGE, feed=Feed([1], [0], torch.tensor([9])),
                   dummy=MAX_TOKENS)
    assert t.shape == (8, 4)
    assert t[0].tolist() == [PENDING, 5, 0, 0]
    assert t[2].tolist() == [6, 7, SCRATCH * PAGE, SCRATCH * PAGE]
    assert t[3].tolist() == [4, 5, 1, 1]
    assert t[4].tolist() == [1, MAX_TOKENS, MAX_TOKENS, MAX_TOKENS]
    assert t[5].tolist() == [0, 0, 0, 0]
    assert t[6:].T.tolist() == [[1, 2], [3, 0], [SCRATCH, 0], [SCRATCH, 0]]


def _decode_step(seqs, tokens):
    """Each sequence's pending token as one decode chunk, and the step in flight that
    sampled them (`tokens`, one row a sequence) with the feed it gives the chunks."""
    chunks = [Chunk(s, s.num_known, 1, logits=1) for s in seqs]
    flight = InFlight(list(seqs), tokens, tokens, None)
    return chunks, flight, flight.feed(chunks)


def _full(chunks, feed):
    """A fresh DecodeGraphs' buffers after the whole-table path (run)."""
    g = graphs()
    g.run(*ModelRunner._kernel_rows(chunks, SimpleNamespace(block_size=PAGE)), feed=feed)
    return g


def test_advancing_a_decode_step_on_the_device_matches_the_whole_table():
    g = graphs()
    seqs = []
    for prompt, table in ((14, [10]), (15, [20]), (31, [30, 31])):
        s = Sequence(list(range(1, prompt + 1)), SamplingParams())
        s.block_table, s.num_pending = list(table), 1
        seqs.append(s)
    tokens = torch.tensor([5, 6, 7])
    chunks, _, feed = _decode_step(seqs, tokens)
    g.run(*ModelRunner._kernel_rows(chunks, SimpleNamespace(block_size=PAGE)), feed=feed)
    g.remember(chunks)
    next_block = 40
    for step in range(1, 20):  # every sequence enters a new block on the way
        for s, t in zip(seqs, tokens.tolist()):
            s.output_ids.append(t)
            if s.num_known % PAGE == 0:
                s.block_table.append(next_block)
                next_block += 1
        tokens = torch.tensor([step * 3 + 5, step * 3 + 6, step * 3 + 7])
        chunks, flight, feed = _decode_step(seqs, tokens)
        assert feed.dst == feed.src == [0, 1, 2]
        out = g.advance(chunks, flight)
        assert out is not None, step
        ref = _full(chunks, feed)
        for name in ("ids", "positions", "slots", "lens"):
            assert getattr(g, name)[:3].tolist() == getattr(ref, name)[:3].tolist(), (step, name)
        for row, s in enumerate(seqs):
            used = s.num_known // PAGE + 1
            assert g.tables[row, :used].tolist() == s.block_table[:used], (step, row)
    assert next_block > 42  # all three crossed a block boundary


def test_a_step_that_does_not_continue_the_last_one_is_not_advanced():
    g = graphs()
    seqs = []
    for prompt in (3, 4):
        s = Sequence(list(range(1, prompt + 1)), SamplingParams())
        s.block_table, s.num_pending = [1], 1
        seqs.append(s)
    chunks, _, feed = _decode_step(seqs, torch.tensor([5, 6]))
    g.run(*ModelRunner._kernel_rows(chunks, SimpleNamespace(block_size=PAGE)), feed=feed)
    g.remember(chunks)
    for s in seqs:
        s.output_ids.append(9)
    swapped, flight, _ = _decode_step(seqs[::-1], torch.tensor([1, 2]))
    assert g.advance(swapped, flight) is None and g.last is None  # another row order
    g.remember(chunks)
    chunks, flight, _ = _decode_step(seqs, torch.tensor([1, 2]))
    other = InFlight(seqs[::-1], flight.tokens, flight.tokens, None)
    assert g.advance(chunks, other) is None  # the rows sampled in another order
    g.remember(_decode_step(seqs[:1], torch.tensor([1]))[0])
    assert g.advance(chunks, flight) is None  # another batch


def _fresh(prompts, tables):
    seqs = []
    for prompt, table in zip(prompts, tables):
        s = Sequence(list(range(1, prompt + 1)), SamplingParams())
        s.block_table, s.num_pending = list(table), 1
        seqs.append(s)
    return seqs


def test_rows_of_sequences_that_left_are_gathered_out_and_padded():
    """A step whose sequences are the last step's with some left out (finished or
    preempted) still advances: the others' rows move up in order and the rows they
    leave behind write only the scratch block (a freed block may be reused at once)."""
    g = graphs()
    seqs = _fresh((14, 15, 31, 40), ([10], [20], [30, 31], [50, 51, 52]))
    tokens = torch.tensor([5, 6, 7, 8])
    chunks, _, feed = _decode_step(seqs, tokens)
    g.run(*ModelRunner._kernel_rows(chunks, SimpleNamespace(block_size=PAGE)), feed=feed)
    g.remember(chunks)
    next_block, leave = 60, {3: 1, 7: 2}  # step: the row that leaves before it
    for step in range(1, 12):
        for s, t in zip(seqs, tokens.tolist()):
            s.output_ids.append(t)
            if s.num_known % PAGE == 0:
                s.block_table.append(next_block)
                next_block += 1
        sampled = list(seqs)  # the step in flight sampled a row for each
        if step in leave:
            seqs.pop(leave[step])
        before = len(sampled)
        chunks = [Chunk(s, s.num_known, 1, logits=1) for s in seqs]
        flight = InFlight(sampled, tokens, tokens, None)
        feed = flight.feed(chunks)
        out = g.advance(chunks, flight)
        assert out is not None and len(out) == len(seqs), step
        ref = _full(chunks, feed)
        n = len(seqs)
        for name in ("ids", "positions", "slots", "lens"):
            assert getattr(g, name)[:n].tolist() == getattr(ref, name)[:n].tolist(), (step, name)
        for row, s in enumerate(seqs):
            used = s.num_known // PAGE + 1
            assert g.tables[row, :used].tolist() == s.block_table[:used], (step, row)
        assert g.slots[n:before].tolist() == [SCRATCH * PAGE] * (before - n), step
        assert g.lens[n:before].tolist() == [1] * (before - n), step
        assert g.tables[n:before, 0].tolist() == [SCRATCH] * (before - n), step
        tokens = torch.arange(n) + 10 * step
    assert len(seqs) == 2 and next_block > 60


def test_a_step_with_a_sequence_the_last_did_not_have_is_not_advanced():
    g = graphs()
    seqs = _fresh((3, 4, 5), ([1], [2], [3]))
    chunks, _, feed = _decode_step(seqs[:2], torch.tensor([5, 6]))
    g.run(*ModelRunner._kernel_rows(chunks, SimpleNamespace(block_size=PAGE)), feed=feed)
    g.remember(chunks)
    for s in seqs[:2]:
        s.output_ids.append(9)
    mixed = [Chunk(s, s.num_known, 1, logits=1) for s in (seqs[0], seqs[2])]
    flight = InFlight(seqs[:2], torch.tensor([1, 2]), torch.tensor([1, 2]), None)
    assert g.advance(mixed, flight) is None
