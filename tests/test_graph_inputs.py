"""The decode graphs' inputs (cuda_graphs.py): one host table per step fills the captured
buffers, the padding rows and the pending ids. The replay itself needs a GPU
(tests/test_gpu.py compares graph and eager outputs there); here the buffers it reads are
checked on the CPU with the replay replaced."""

from __future__ import annotations

import torch

from dwc.runtime.cuda_graphs import DecodeGraphs, step_table
from dwc.runtime.inflight import Feed
from dwc.runtime.scheduler import PENDING

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
