"""Speculative decoding with a draft model: lossless, at any batch size.

Each step, for every decoding sequence the scheduler gave K lookahead slots, the draft
proposes K tokens d_1..d_K one at a time (sampling each from its own distribution q_i),
and the target scores the sequence's last token and the K proposals in one forward pass,
which yields its distributions p_1..p_{K+1}. `accept` keeps a prefix of the proposals
and adds one token of its own, so every verification step emits between 1 and K + 1
tokens and the output has exactly the distribution of sampling from the target alone.

The draft has its own paged KV cache with the same slot layout as the target's, so it
shares the block tables (and the block manager): rolling back rejected tokens is cutting
the sequence's token count, and freeing the blocks only the rejected tokens used. The
draft's cache mirrors the target's: every token whose K/V the target computes, the draft
computes too (prefill chunks and requests that do not speculate included), so a prefix
served from the cache is valid for both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dwc.runtime.block_manager import BlockManager
from dwc.runtime.model_runner import ModelRunner
from dwc.runtime.sampler import distribution, draw, generator
from dwc.runtime.scheduler import Chunk


def accept(p: torch.Tensor, q: torch.Tensor, drafted: list[int],
           gen: torch.Generator | None = None) -> tuple[list[int], int]:
    """The speculative sampling rule (Leviathan et al. 2023; Chen et al. 2023).

    p: [K + 1, V] the target's distributions at the K drafted positions and the one after;
    q: [K, V] the draft's distributions the tokens were drafted from; drafted: d_1..d_K.
    Returns (tokens to append, how many drafted tokens were accepted).

    For i = 1..K: accept d_i with probability min(1, p_i(d_i) / q_i(d_i)); at the first
    rejection, sample the replacement from the residual norm(max(0, p_i - q_i)) and stop.
    If all K are accepted, sample one more token from p_{K+1}.

    Why this is exactly the target's distribution at each position: the chance of emitting
    x is q(x) min(1, p(x)/q(x)) = min(q(x), p(x)) by acceptance, plus the chance of a
    rejection, sum_y (q(y) - min(q(y), p(y))) = sum_y max(0, p(y) - q(y)) (both equal
    1 - sum_y min(p(y), q(y))), times the residual's max(0, p(x) - q(x)) / that same sum:
    min(q(x), p(x)) + max(0, p(x) - q(x)) = p(x).

    Greedy decoding is the temperature-0 case: p and q are one-hot (see
    `sampler.distribution`), so d_i is accepted exactly when it is the target's argmax
    (p/q = 1 > r; otherwise p(d_i) = 0), and the residual is one-hot at the target's
    argmax: the output is token for token the target's own greedy output.
    """
    k = len(drafted)
    idx = torch.tensor(drafted, device=p.device).unsqueeze(1)
    p_d = p[:k].gather(1, idx).squeeze(1)
    q_d = q.gather(1, idx).squeeze(1)               # > 0: each d_i was drawn from q_i
    r = torch.rand(k, generator=gen, device=p.device)
    ok = (r * q_d < p_d).tolist()                   # r < p/q, without dividing
    a = ok.index(False) if False in ok else k
    if a == k:
        last = p[k]
    else:
        residual = (p[a] - q[a]).clamp(min=0)
        # Rejection needs p(d) < q(d), so the residual has mass; a float-rounding
        # rejection where p == q would leave none: then p itself is the answer.
        last = residual if float(residual.sum()) > 0 else p[a]
    token = int(torch.multinomial(last / last.sum(), 1, generator=gen))
    return drafted[:a] + [token], a


def accept_greedy(target_argmax: list[int], drafted: list[int]) -> tuple[list[int], int]:
    """`accept` at temperature 0 in closed form (p and q one-hot): keep the drafted tokens
    while they equal the target's argmax, then the target's argmax at the first
    difference (or after the last). Same result, without K + 1 one-hot vectors and
    device round trips per sequence (tests check the two agree)."""
    a = 0
    while a < len(drafted) and drafted[a] == target_argmax[a]:
        a += 1
    return drafted[:a] + [target_argmax[a]], a


@dataclass
class SpecStats:
    steps: int = 0          # verification steps
    drafted: int = 0        # draft tokens proposed
    accepted: int = 0       # of those, accepted by the target

    def as_dict(self) -> dict:
        return {"steps": self.steps, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": round(self.accepted / self.drafted, 4) if self.drafted else None,
                "mean_accepted_tokens": round(1 + self.accepted / self.steps, 4)
                if self.steps else None}


class Proposer:
    """What proposes draft tokens and verifies them: the draft model (Drafter), an
    EAGLE head (eagle.py) or n-gram lookup in the sequence itself (ngram.py).
    `has_cache`: it keeps a KV cache that mirrors the target's (blocks are shared only
    when both hold them)."""

    has_cache = False
    method = ""

    def __init__(self, k: int):
        self.k = k
        self.stats = SpecStats()

    def lookahead(self, seq, k: int) -> int:
        """How many of a decoding sequence's `k` lookahead slots to use this step."""
        return k

    def propose(self, chunks: list[Chunk], blocks: BlockManager) -> None:
        """Fill each verification chunk's `lookahead` draft tokens (chunk.draft, and for
        a sampled request chunk.draft_probs, the distributions they were drawn from)."""
        raise NotImplementedError

    def verify(self, chunks: list[Chunk], logits: list[torch.Tensor]) -> list[list[int]]:
        """The tokens each verification chunk yields, from the target's logits
        ([K + 1, V] per chunk): greedy chunks in closed form off one argmax of them all."""
        greedy = [i for i, c in enumerate(chunks) if c.seq.params.temperature <= 0]
        argmax = torch.cat([logits[i] for i in greedy]).argmax(-1).tolist() if greedy else []
        out, at = [], 0  # at: where the next greedy chunk's rows start in `argmax`
        for c, rows in zip(chunks, logits):
            if c.seq.params.temperature <= 0:
                tokens, accepted = accept_greedy(argmax[at:at + len(rows)], c.draft)
                at += len(rows)
            else:
                p = distribution(rows, c.seq.params)
                tokens, accepted = accept(p, _draft_distributions(c, p), c.draft,
                                          generator(c.seq, p.device))
            self.stats.steps += 1
            self.stats.drafted += len(c.draft)
            self.stats.accepted += accepted
            out.append(tokens)
        return out


def _draft_distributions(c: Chunk, p: torch.Tensor) -> torch.Tensor:
    """[K, V] q of a sampled chunk's draft: the draft model's distributions, or one-hot
    at each token for a proposer that picks tokens without sampling (n-gram lookup:
    then `accept` keeps d with probability p(d) and resamples from p without d)."""
    if c.draft_probs:
        return torch.stack(c.draft_probs)
    q = torch.zeros(len(c.draft), p.shape[-1], device=p.device, dtype=p.dtype)
    q[torch.arange(len(c.draft)), torch.tensor(c.draft)] = 1.0
    return q


class Drafter(Proposer):
    """Runs the draft model over the target's chunks; its proposals are verified by
    Proposer.verify."""

    has_cache = True
    method = "draft_model"

    def __init__(self, runner: ModelRunner, k: int):
        super().__init__(k)
        self.runner = runner

    def propose(self, chunks: list[Chunk], blocks: BlockManager) -> None:
        """Bring the draft's cache up to each chunk's own tokens, then draft each
        verification chunk's `lookahead` tokens (into chunk.draft / chunk.draft_probs)."""
        catch_up = []
        for c in chunks:
            done = c.seq.draft_computed  # <= c.start: a step never rolls back below it
            catch_up.append(Chunk(c.seq, done, c.end - done, logits=1 if c.lookahead else 0))
            c.seq.draft_computed = c.end
        logits = self.runner.run(catch_up, blocks)
        drafting = [c for c in chunks if c.lookahead]
        while drafting:
            append_drafts(drafting, logits)
            drafting = [c for c in drafting if len(c.draft) < c.lookahead]
            if drafting:  # the token just drafted, at position end - 1 + len(draft)
                step = [Chunk(c.seq, c.end - 1 + len(c.draft), 1, logits=1, draft=c.draft)
                        for c in drafting]
                logits = self.runner.run(step, blocks)
                for c in drafting:
                    c.seq.draft_computed += 1


def append_drafts(drafting: list[Chunk], logits: torch.Tensor) -> None:
    """Each drafting chunk's next draft token from its row of `logits`: the argmax, or
    for a sampled request a draw from its distribution q, kept for the accept rule."""
    greedy = logits.argmax(-1).tolist()  # one device sync for the greedy rows
    for c, row, g in zip(drafting, logits, greedy):
        if c.seq.params.temperature > 0:
            q = distribution(row, c.seq.params)
            c.draft.append(draw(q, c.seq))
            c.draft_probs.append(q)
        else:
            c.draft.append(g)
