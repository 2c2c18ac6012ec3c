"""Speculation with an EAGLE head (docs/SPECULATION.md, "eagle"; the head itself:
dwc/model/eagle_head.py).

The head is one decoder layer with its own paged KV cache (one layer's worth), laid out
like the target's so it shares the block tables, as the draft model's does
(speculative.py). Its entry at position p reads the token x_p and the target's feature
g_{p-1} of the position before, so it can only be computed once the target has run
position p - 1: it trails the target. Each step:

  observe (after each target step, ModelRunner.observers): the target's tapped layer
      outputs for every token it computed ([tokens, 3 * hidden], Decoder.taps) become
      g = fc(...) per position, kept on the sequence (`Features`: references to rows of
      the step's output, no copy) until the head has read them (`Gather`: one
      index_select for every sequence of the next step; a kernel or two per sequence
      and step before, which a GPU step of 32 sequences paid in launches);
  propose (before the next step): the head catches up on every chunk's positions from
      `seq.draft_computed` to the chunk's first position (that one's x is known and g of
      the one before is kept), then, for a verification chunk, drafts its lookahead as a
      chain: each later step reads the head's own previous output o in place of g.

The chain's entries are not kept: `draft_computed` stops at the chunk's first position
plus one, so the next catch-up rewrites the accepted positions with the target's real
features (what the head was trained on). A feature the head needs and the target did
not compute in this engine (a prefix served from the cache) reads as zeros, as at
position 0; that changes what is proposed, never what is accepted: verification is the
lossless rule of speculative.py for every proposer.

The target's tapped layers are kept by eager steps only: an engine with this proposer
runs its target without CUDA graphs (ModelRunner.plan; docs/SPECULATION.md).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from dwc.runtime.block_manager import BlockManager
from dwc.runtime.inflight import to_device
from dwc.runtime.model import Decoder
from dwc.runtime.model_runner import ModelRunner
from dwc.runtime.scheduler import Chunk
from dwc.runtime.speculative import Proposer, append_drafts


class HeadDecoder(Decoder):
    """The runtime's Decoder over the head's one layer: its input is fuse(embedding,
    feature) instead of the embedding, and it keeps the output hidden state of the rows
    it returns logits for (the chain's next feature)."""

    fuse: torch.nn.Module = None
    features: torch.Tensor | None = None   # [tokens, hidden]: the feature before each row
    out: torch.Tensor | None = None        # [rows, hidden]: o of the returned rows

    def head(self, ids, positions, slots, cache, q_out=None):
        e = self.embed(ids)                                               # [t, hidden]
        # Timing a step (the compiler's cost ratio) runs without features: zeros then.
        f = self.features if self.features is not None else torch.zeros_like(e)
        h = self.fuse(torch.cat([e, f], -1))
        cos, sin = self.rotary.cos_sin(positions, h.dtype)
        q, residual = self._start(0, h, None, cos, sin, slots, cache[0], q_out)
        return q, residual, cos, sin

    def logits(self, hidden, rows) -> torch.Tensor:
        self.out = hidden[rows]
        return super().logits(hidden, rows)


def head_runner(head, target, num_blocks: int, block_size: int, device: str,
                dtype: torch.dtype) -> ModelRunner:
    """A ModelRunner for the head (moved to `device` / `dtype`), over the target's
    embedding, final norm, rotary tables and LM head (`target`: the transformers model
    the target's runner holds)."""
    head.to(device, dtype).eval().requires_grad_(False)
    inner = target.model
    view = SimpleNamespace(config=head.config, lm_head=target.lm_head, model=SimpleNamespace(
        embed_tokens=inner.embed_tokens, layers=torch.nn.ModuleList([head.layer]),
        norm=inner.norm, rotary_emb=inner.rotary_emb))
    runner = ModelRunner(view, num_blocks, block_size, device, decoder_cls=HeadDecoder)
    runner.decoder.fuse = head.fuse
    return runner


class Features:
    """The target's g of a sequence's positions [base, base + length), until read: as
    segments of the step outputs that hold them, (tensor, first row, rows), not copies,
    so keeping and reading them costs no kernel per sequence (`EagleProposer.propose`
    gathers every row it needs at once)."""

    def __init__(self):
        self.base, self.length, self.segments = 0, 0, []

    def put(self, start: int, g: torch.Tensor, row: int, n: int) -> None:
        """g of positions [start, start + n) are rows [row, row + n) of `g`; later
        positions are dropped (a rejected draft's rows are rewritten by the step that
        recomputes them)."""
        if not self.length or not self.base <= start <= self.base + self.length:
            self.base, self.length, self.segments = start, n, [(g, row, n)]
            return
        self._keep(start - self.base)
        self.segments.append((g, row, n))
        self.length += n

    def _keep(self, count: int) -> None:
        """Keep the first `count` positions only."""
        kept, left = [], count
        for g, row, n in self.segments:
            if left <= 0:
                break
            kept.append((g, row, min(n, left)))
            left -= n
        self.segments, self.length = kept, min(self.length, count)

    def at(self, pos: int) -> tuple[torch.Tensor, int] | None:
        """(tensor, row) holding g of `pos`, or None when none is kept."""
        offset = pos - self.base
        if not 0 <= offset < self.length:
            return None
        for g, row, n in self.segments:
            if offset < n:
                return g, row + offset
            offset -= n
        return None

    def drop_before(self, pos: int) -> None:
        drop = min(pos - self.base, self.length)
        if drop <= 0:
            return
        segments = []
        for g, row, n in self.segments:
            if drop >= n:
                drop -= n
                continue
            segments.append((g, row + drop, n - drop))
            drop = 0
        self.length -= min(pos - self.base, self.length)
        self.base, self.segments = pos, segments


class Gather:
    """Rows of several tensors as one index over their concatenation (a zero row last,
    for positions with no feature): one cat and one index_select for a whole step."""

    def __init__(self):
        self.sources, self.offsets, self.index, self.total = [], {}, [], 0

    def add(self, ref: tuple[torch.Tensor, int] | None) -> None:
        if ref is None:
            self.index.append(-1)
            return
        g, row = ref
        start = self.offsets.get(id(g))
        if start is None:
            start = self.offsets[id(g)] = self.total
            self.sources.append(g)
            self.total += g.shape[0]
        self.index.append(start + row)

    def rows(self, zero: torch.Tensor) -> torch.Tensor:
        if not self.index:
            return zero[:0]
        missing = -1 in self.index
        if len(self.sources) == 1 and not missing:
            source = self.sources[0]  # the common case: the last step's output alone
        else:  # (a cat copies whole step outputs: a prefill's can be large)
            source = torch.cat([*self.sources, zero] if missing else self.sources)
        index = [self.total if i < 0 else i for i in self.index] if missing else self.index
        return source.index_select(0, to_device(index, source.device))


class EagleProposer(Proposer):
    has_cache = True
    method = "eagle"

    def __init__(self, runner: ModelRunner, fc: torch.nn.Module, target: ModelRunner,
                 taps: tuple[int, ...], k: int):
        super().__init__(k)
        self.runner, self.fc, self.target = runner, fc, target.decoder
        if self.target.taps != tuple(taps) and (target.graphs or target.pieces):
            # Graphs captured without these taps cannot keep them: the target runs
            # eagerly (an Engine passes the taps to the runner before capture instead).
            target.graphs = target.pieces = None
        self.target.taps = tuple(taps)  # the target's steps keep these layers' outputs
        target.observers = (self.observe,)

    @classmethod
    def load(cls, folder: Path, target_runner: ModelRunner, num_blocks: int,
             block_size: int, k: int) -> "EagleProposer":
        """The head in `folder` (draft/ of a bundle), beside the target's runner."""
        from dwc.model.eagle_head import load_head

        model = target_runner.hf_model
        head = load_head(folder, model)
        runner = head_runner(head, model, num_blocks, block_size, target_runner.device,
                             target_runner.decoder.dtype)
        return cls(runner, head.fc, target_runner, head.taps, k)

    @torch.inference_mode()
    def observe(self, chunks: list[Chunk]) -> None:
        """After each target step (ModelRunner.observers): keep g of every position it
        computed, per sequence."""
        g = self.fc(self.target.tapped)                                    # [tokens, hidden]
        offset = 0
        for c in chunks:
            state = c.seq.proposer = c.seq.proposer or Features()
            state.put(c.start, g, offset, c.length)
            offset += c.length

    @torch.inference_mode()
    def propose(self, chunks: list[Chunk], blocks: BlockManager) -> None:
        """Catch the head up to each chunk's first position, then draft each verification
        chunk's `lookahead` tokens (chunk.draft / chunk.draft_probs)."""
        catch_up, feats = [], Gather()
        for c in chunks:
            state = c.seq.proposer = c.seq.proposer or Features()
            done, upto = min(c.seq.draft_computed, c.start), c.start + 1
            catch_up.append(Chunk(c.seq, done, upto - done, logits=1 if c.lookahead else 0))
            for pos in range(done - 1, upto - 1):  # the feature before each position
                feats.add(state.at(pos))
            state.drop_before(c.start)
            c.seq.draft_computed = upto
        d = self.runner.decoder
        d.features = feats.rows(self.fc.weight.new_zeros(1, self.fc.out_features))
        logits = self.runner.run(catch_up, blocks)
        drafting = [c for c in chunks if c.lookahead]
        while drafting:
            append_drafts(drafting, logits)
            keep = [i for i, c in enumerate(drafting) if len(c.draft) < c.lookahead]
            if keep:  # the chain: each row's own output o is its next feature
                d.features = d.out[keep]
                drafting = [drafting[i] for i in keep]
                step = [Chunk(c.seq, c.end - 1 + len(c.draft), 1, logits=1, draft=c.draft)
                        for c in drafting]
                logits = self.runner.run(step, blocks)
            else:
                drafting = []
        d.features = d.out = None
