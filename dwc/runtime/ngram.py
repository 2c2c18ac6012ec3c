"""n-gram (prompt lookup) speculation: draft tokens copied from the sequence itself.

No draft model and no training: when the last n tokens of a sequence (prompt and output)
occurred earlier in it, the tokens that followed that occurrence are proposed as the
next ones, and the target verifies them as it verifies a draft model's (the same
lossless rule, speculative.py). It pays where text repeats: code edits, quoting the
prompt, structured output. The longest n from NGRAM_MAX_N down to NGRAM_MIN_N wins, and
its most recent occurrence. A sequence with no match verifies nothing that step (its
lookahead is 0), so the target does no work for a draft that does not exist.

Each sequence keeps an index from n-gram to where it last ended (`Sequence.proposer`),
extended by the tokens appended since the last lookup: O(NGRAM_MAX_N) per new token.
"""

from __future__ import annotations

from dwc.constants import NGRAM_MAX_N, NGRAM_MIN_N
from dwc.runtime.block_manager import BlockManager
from dwc.runtime.scheduler import Chunk
from dwc.runtime.sequence import Sequence
from dwc.runtime.speculative import Proposer


class NgramIndex:
    """n-gram -> the end (exclusive) of its latest occurrence, for the tokens up to but
    not including the sequence's last one (the current suffix is looked up, not indexed:
    it would match itself)."""

    def __init__(self):
        self.tokens: list[int] = []  # the sequence's prompt and output, as last seen
        self.ends: dict[tuple, int] = {}
        self.indexed = 0  # tokens[:indexed] have their n-grams in `ends`
        self.proposal: list[int] | None = None  # the last lookup's, for len(tokens)

    def extend(self, seq: Sequence) -> None:
        """Take the tokens the sequence gained since the last call (its prompt first)."""
        if not self.tokens:
            self.tokens = list(seq.prompt_ids)
        self.tokens += seq.output_ids[len(self.tokens) - len(seq.prompt_ids):]

    def propose(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest
        matching suffix of the tokens; [] when no suffix of NGRAM_MIN_N or more recurs."""
        tokens = self.tokens
        for end in range(self.indexed + 1, len(tokens)):
            for n in range(NGRAM_MIN_N, NGRAM_MAX_N + 1):
                if end >= n:
                    self.ends[tuple(tokens[end - n:end])] = end
        self.indexed = max(self.indexed, len(tokens) - 1)
        for n in range(min(NGRAM_MAX_N, len(tokens) - 1), NGRAM_MIN_N - 1, -1):
            end = self.ends.get(tuple(tokens[-n:]))
            if end is not None:
                return tokens[end:end + k]
        return []


def lookup(tokens: list[int], k: int) -> list[int]:
    """What the proposer drafts after `tokens` (a prompt and output so far): the build
    measures n-gram speculation with it (dwc/compiler/speculation.py)."""
    index = NgramIndex()
    index.tokens = list(tokens)
    return index.propose(k)


class NgramProposer(Proposer):
    method = "ngram"

    def lookahead(self, seq: Sequence, k: int) -> int:
        return min(k, len(self._proposal(seq)))

    def propose(self, chunks: list[Chunk], blocks: BlockManager) -> None:
        for c in chunks:
            if c.lookahead:
                c.draft = self._proposal(c.seq)[:c.lookahead]

    def _proposal(self, seq: Sequence) -> list[int]:
        """Up to K tokens for the sequence as it is now, looked up once a step (the
        scheduler asks how many, then the step takes them)."""
        index = seq.proposer = seq.proposer or NgramIndex()
        if len(index.tokens) != seq.num_tokens or index.proposal is None:
            index.extend(seq)
            index.proposal = index.propose(self.k)
        return index.proposal
