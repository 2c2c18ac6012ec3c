"""A request's state inside the engine: its tokens, sampling settings and KV blocks."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

_ids = itertools.count()


@dataclass
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 1 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    speculative: bool = True          # use the draft when the engine has one
    logprobs: int | None = None       # None: none; k: each generated token's logprob + top k
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (all but the first)


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity: the scheduler's lists find and remove it by `is`
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0             # tokens whose K/V are in the cache
    num_cached: int = 0               # of those, how many came from the prefix cache
    draft_computed: int = 0           # tokens whose K/V are in the draft model's cache
    proposer: object = None           # the n-gram proposer's index of it (ngram.py)
    num_sealed: int = 0               # leading blocks of block_table with a prefix key
    # Tokens sampled on the GPU by a step still in flight (asynchronous scheduling): they
    # count as the sequence's (positions, cache slots) before their ids reach the host.
    num_pending: int = 0
    finish_reason: str | None = None
    generator: object = None          # torch.Generator when a seed is given
    # (logprob, [(token id, logprob)] top k) per output token, when params.logprobs is set;
    # per prompt token after the first, when params.prompt_logprobs is (logprobs.py).
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        """Tokens so far, pending ones included (see num_pending)."""
        return len(self.prompt_ids) + len(self.output_ids) + self.num_pending

    @property
    def num_known(self) -> int:
        """Tokens whose ids the host holds: prompt and output, not pending ones."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_prefill(self) -> bool:
        return self.num_computed < len(self.prompt_ids)

    def reset_for_recompute(self) -> None:
        """Preempted: its blocks are gone; generated tokens stay and are recomputed."""
        self.block_table = []
        self.num_sealed = 0
        self.num_computed = 0
        self.num_cached = 0
        self.draft_computed = 0
        self.status = Status.WAITING


@dataclass
class Completion:
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    finish_reason: str


def raw_text(tokenizer, seq: Sequence, eos_ids: set[int]) -> str:
    """The output decoded, without EOS tokens (unless the request ignores EOS)."""
    return tokenizer.decode([t for t in seq.output_ids
                             if t not in eos_ids or seq.params.ignore_eos])


def cut_at_stop(text: str, stops) -> str:
    """`text` cut before the first of the stop strings it contains."""
    cuts = [text.find(s) for s in stops if s in text]
    return text[:min(cuts)] if cuts else text


def eos_ids(hf_model, tokenizer) -> set[int]:
    """The ids that end a sequence: the generation config's and the tokenizer's EOS."""
    ids = hf_model.generation_config.eos_token_id
    ids = ids if isinstance(ids, list) else [ids]
    return {i for i in ids + [tokenizer.eos_token_id] if i is not None}


def finish_reason(seq: Sequence, token: int, eos: set[int], tokenizer, max_context: int
                  ) -> str | None:
    """Why `token`, just appended, ends `seq` ("stop", "length"), or None."""
    p = seq.params
    if token in eos and not p.ignore_eos:
        return "stop"
    if p.stop and _stop_in_tail(seq, tokenizer, eos, p.stop):
        return "stop"
    if len(seq.output_ids) >= p.max_tokens or seq.num_known >= max_context:
        return "length"
    return None


def _stop_in_tail(seq: Sequence, tokenizer, eos: set[int], stops) -> bool:
    """Whether a stop string has appeared, checked on the last few tokens' text: one that
    appeared earlier would have ended the sequence then, so only one ending in the
    newest token is new, and its text lies in the last 4 tokens per character (a byte-
    level token may hold a quarter of one) plus two (the window's first may lose a
    leading space in decoding). A window that starts inside a character decodes to
    U+FFFD there -- SentencePiece's byte tokens turn a whole run of them into U+FFFD --
    so it starts up to 3 tokens earlier until it does not. Decoding the whole output
    instead cost 0.17 ms per sequence and step at 1,000 tokens: 44 ms a step at batch
    256."""
    span = 4 * max(len(x) for x in stops) + 2
    out = [t for t in seq.output_ids[-(span + 3):] if t not in eos or seq.params.ignore_eos]
    start = max(len(out) - span, 0)
    text = tokenizer.decode(out[start:])
    while text.startswith("\ufffd") and start > 0:
        start -= 1
        text = tokenizer.decode(out[start:])
    return any(x in text for x in stops)
