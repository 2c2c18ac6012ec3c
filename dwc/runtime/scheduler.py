"""Continuous batching with chunked prefill and preemption by recompute (FCFS).

Each step the scheduler hands the model runner a list of (sequence, n) chunks under a
token budget: first the running sequences (one decode token each, or the next piece of a
prefill), oldest first; then waiting sequences, oldest first, while the budget, the
sequence limit and the free blocks allow. When blocks run out, the newest running
sequence is preempted: its blocks are freed and it waits again at the front of the
queue, to be recomputed (its generated tokens are kept).

With speculative decoding (`num_speculative` = K > 0), a decoding sequence's chunk is a
verification step: its last token plus K draft tokens the engine's drafter fills in
before the model runs, so the scheduler reserves K + 1 slots (and budget) for it. K is
cut so that accepting every draft token and the one after them never passes the
request's max_tokens.
"""

from __future__ import annotations

from collections import deque

from dwc.runtime.block_manager import BlockManager
from dwc.runtime.sequence import Sequence, Status

PENDING = -1  # the id of a token still on the device (Chunk.token_ids)


class Chunk:
    """One sequence's share of a step. A plain class with slots: the scheduler makes one
    per running sequence a step, a hot path at large batches (issue 18)."""

    __slots__ = ("seq", "start", "length", "logits", "lookahead", "draft", "draft_probs")

    def __init__(self, seq: Sequence, start: int, length: int, logits: int = 0,
                 lookahead: int = 0, draft: list[int] | None = None,
                 draft_probs: list | None = None):
        self.seq = seq
        self.start = start      # first token position computed in this step
        self.length = length    # tokens computed in this step, draft tokens included
        self.logits = logits    # how many of its last rows' logits the step returns
        self.lookahead = lookahead  # draft tokens it verifies (the last `lookahead` of `length`)
        self.draft = [] if draft is None else draft  # tokens after seq.tokens
        self.draft_probs = [] if draft_probs is None else draft_probs  # the draft's q for each

    def __repr__(self) -> str:
        return (f"Chunk(seq={self.seq.id}, start={self.start}, length={self.length}, "
                f"logits={self.logits}, lookahead={self.lookahead}, draft={self.draft})")

    def token_ids(self) -> list[int]:
        """(prompt + output + pending + draft)[start:start + length], without building
        the whole list (a decode step needs one token of a long context). A pending token
        (sampled by the step in flight, not yet on the host) is PENDING: the runner takes
        its id from that step's output on the device."""
        seq, start, end = self.seq, self.start, self.start + self.length
        p, k, n = len(seq.prompt_ids), seq.num_known, seq.num_tokens
        pending = [PENDING] * (min(end, n) - max(start, k)) if end > k and start < n else []
        return (seq.prompt_ids[start:end] + seq.output_ids[max(start - p, 0):max(end - p, 0)]
                + pending + self.draft[max(start - n, 0):max(end - n, 0)])

    @property
    def end(self) -> int:
        """One past the last of the sequence's own (non-draft) positions it computes."""
        return self.start + self.length - self.lookahead


def chunk_for(seq: Sequence, n: int, lookahead: int = 0) -> Chunk:
    """The next `n` of `seq`'s own tokens, plus `lookahead` draft positions; it returns
    logits (1 + lookahead rows) when it reaches the sequence's last token."""
    start = seq.num_computed
    reaches_end = start + n == seq.num_tokens
    return Chunk(seq, start, n + lookahead, logits=1 + lookahead if reaches_end else 0,
                 lookahead=lookahead)


def wants_logprobs(params) -> bool:
    """Logprobs are recorded on the host from a step's logits: such a step cannot
    overlap the next (engine.py)."""
    return params.logprobs is not None or params.prompt_logprobs is not None


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 num_speculative: int = 0, proposer=None):
        """`proposer` (speculative.Proposer): asked how many of a sequence's lookahead
        slots it can fill (an n-gram proposer has none without a match)."""
        self.blocks = blocks
        self.num_speculative = num_speculative
        self.proposer = proposer
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        # Sequences here that are sampled / want logprobs: while none is, the engine
        # need not look at each chunk for them (a hot path at large batches).
        self.num_sampled = self.num_logprobs = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self._count(seq, 1)

    def _count(self, seq: Sequence, sign: int) -> None:
        self.num_sampled += sign * (seq.params.temperature > 0)
        self.num_logprobs += sign * wants_logprobs(seq.params)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Chunk]:
        budget = self.max_num_batched_tokens
        chunks: list[Chunk] = []
        if self.running:
            budget = self._schedule_running(chunks, budget)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_pending:
                break  # preempted with a token in flight: recomputed once it arrives
            if seq.num_computed == 0 and not seq.block_table:
                self.blocks.match_prefix(seq)
                seq.draft_computed = seq.num_computed  # the draft's cache mirrors the target's
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self.blocks.can_grow(seq, seq.num_computed + n):
                # Waiting sequences hold no blocks: give back the prefix it matched (the
                # hashes stay, so it matches again next time unless they were evicted).
                self.blocks.release(seq)
                seq.reset_for_recompute()
                if not self.running:  # nothing will free blocks: the cache is too small
                    raise RuntimeError(f"KV cache too small for one chunk of {n} tokens")
                break
            self.blocks.grow(seq, seq.num_computed + n)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            chunks.append(chunk_for(seq, n))
            budget -= n
        return chunks

    def _schedule_running(self, chunks: list[Chunk], budget: int) -> int:
        """Chunks for the running sequences, oldest first; returns the budget left. The
        host's hottest loop at large batches (issue 18: host time per step), so it reads
        each sequence's fields once."""
        page, spec, running = self.blocks.block_size, self.num_speculative, Status.RUNNING
        append = chunks.append
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq.status is not running:
                continue  # preempted earlier in this loop
            out = len(seq.output_ids) + seq.num_pending
            if out >= seq.params.max_tokens:
                continue  # its last token is pending: it finishes when that arrives
            start = seq.num_computed
            left = len(seq.prompt_ids) + out - start
            if left == 1 and not spec:  # a decode step (the common case)
                if start >= len(seq.block_table) * page and not self._make_room(seq, start + 1):
                    continue  # it enters a block and none was free (it was preempted)
                append(Chunk(seq, start, 1, 1))
                budget -= 1
            else:
                n = left if left < budget else budget
                k = self._lookahead(seq, budget) if spec and left == 1 else 0
                total = start + n + k
                # Most steps stay inside the last block: no block-manager call then.
                if total > len(seq.block_table) * page and not self._make_room(seq, total):
                    continue
                append(Chunk(seq, start, n + k, 1 + k if n == left else 0, k))
                budget -= n + k
        return budget

    def _lookahead(self, seq: Sequence, budget: int) -> int:
        """Draft tokens to verify for a decoding sequence (0: a plain decode step)."""
        if not (self.num_speculative and seq.params.speculative):
            return 0
        left = seq.params.max_tokens - len(seq.output_ids) - 1
        k = max(0, min(self.num_speculative, left, budget - 1))
        return self.proposer.lookahead(seq, k) if k and self.proposer else k

    def _make_room(self, seq: Sequence, total: int) -> bool:
        """Grow `seq` to `total` tokens, preempting the newest others if needed."""
        while not self.blocks.can_grow(seq, total):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        self.blocks.grow(seq, total)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire a sequence (done, stopped or aborted) and return its blocks."""
        for queue in (self.running, self.waiting):
            if seq in queue:
                queue.remove(seq)
                self._count(seq, -1)
                break
        self.blocks.release(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.num_pending = 0  # a token still in flight for it is dropped when it arrives
