"""Next-token sampling: greedy, temperature, top-k, top-p, per-request seeds.

A step's tokens are drawn on the logits' device for all rows at once, with no host
sync (`sample_tensor`), so sampled requests overlap like greedy ones (inflight.py):
each row's logits are scaled by its temperature, filtered by its top-k / top-p, and the
token is argmax(p / E) with E ~ Exp(1) drawn per vocabulary entry -- the exponential
race, an exact draw from p. A seeded request draws its row of E from its own generator,
so its tokens do not depend on the batch it shares (docs/RUNTIME.md, "Sampling")."""

from __future__ import annotations

import torch

from dwc.runtime.inflight import to_device
from dwc.runtime.sequence import SamplingParams, Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits: [len(seqs), vocab] float32 -> one token id per sequence."""
    return sample_tensor(logits, seqs).tolist()  # one device sync


def sample_tensor(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """One token id per row of logits [len(seqs), vocab], on their device, without
    waiting for it: the argmax for greedy requests, a draw for sampled ones."""
    greedy = logits.argmax(-1)
    params = [seq.params for seq in seqs]
    if all(p.temperature <= 0 for p in params):
        return greedy
    dev = logits.device
    # Every row's settings in one host-to-device copy: temperature (1 for a greedy row),
    # top_k, top_p, and whether the row is greedy.
    rows = to_device([x for p in params for x in (p.temperature if p.temperature > 0 else 1.0,
                                                   p.top_k, p.top_p, p.temperature <= 0)],
                     dev, torch.float32).view(-1, 4)
    x = logits.float() / rows[:, 0:1]
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        x = filter_rows(x, rows[:, 1].long(), rows[:, 2])
    probs = torch.softmax(x, dim=-1)
    race = torch.empty_like(probs).exponential_()
    for i, seq in enumerate(seqs):  # seeded requests: their own stream, row by row
        if params[i].seed is not None and params[i].temperature > 0:
            race[i].exponential_(generator=generator(seq, dev))
    # CUDA's exponential_ excludes 0; the CPU's may return it, and p / 0 would be inf
    # (NaN for a filtered token, which argmax would pick): one in 2^24 draws.
    drawn = (probs / race.clamp_min_(torch.finfo(torch.float32).tiny)).argmax(-1)
    return torch.where(rows[:, 3] > 0, greedy, drawn)


def filter_rows(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """filter_logits for every row of [n, vocab] at once, with each row's own top_k
    ([n] long, 0: off) and top_p ([n] float, 1: off), on the logits' device: one sort,
    the same ties kept."""
    vocab = logits.shape[-1]
    ordered, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    kth = ordered.gather(1, (k - 1)[:, None])
    ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    probs = torch.softmax(ordered, dim=-1)
    before = probs.cumsum(-1) - probs  # the mass before each entry
    drop = (before >= top_p[:, None]) & (top_p < 1.0)[:, None]
    ordered = ordered.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, ordered)


def distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a request samples from, for one row [vocab] or rows [n, vocab]:
    softmax of the temperature-scaled, top-k / top-p filtered logits; at temperature 0
    (greedy) the one-hot vector of the argmax, so that greedy is the limit case of the
    same rule everywhere (speculative decoding relies on it)."""
    if logits.dim() == 2:
        return torch.stack([distribution(row, params) for row in logits])
    if params.temperature <= 0:
        return torch.nn.functional.one_hot(logits.argmax(), logits.numel()).to(logits.dtype)
    filtered = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    return torch.softmax(filtered, dim=-1)


def generator(seq: Sequence, device) -> torch.Generator | None:
    """The request's own random stream when it has a seed (None: torch's global one)."""
    if seq.generator is None and seq.params.seed is not None:
        seq.generator = torch.Generator(device=device).manual_seed(seq.params.seed)
    return seq.generator


def draw(probs: torch.Tensor, seq: Sequence) -> int:
    return int(torch.multinomial(probs, 1, generator=generator(seq, probs.device)))


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Keep the top_k largest logits and the smallest set whose probability >= top_p."""
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # Stable: top-p cuts ties at its boundary by index, as filter_rows does.
        sorted_logits, order = torch.sort(logits, descending=True, stable=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # mass before it
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    return logits


def chunk_tokens(chunks, logits: torch.Tensor, drafter) -> list[list[int]]:
    """Per chunk of a step, the tokens it yields from the step's logits: none (a piece of
    a prefill), one sampled token, or a verification step's accepted draft tokens and
    one more (`drafter`: the engine's speculative.Drafter)."""
    out: list[list[int]] = [[] for _ in chunks]
    plain, row = [], 0  # (chunk index, its logits row) of chunks that sample one token
    verifying = []      # (chunk index, its logits rows) of verification chunks
    for i, c in enumerate(chunks):
        if c.lookahead and c.logits:
            verifying.append((i, logits[row:row + c.logits]))
        elif c.logits:
            plain.append((i, row))
        row += c.logits
    if verifying:
        tokens = drafter.verify([chunks[i] for i, _ in verifying],
                                [rows for _, rows in verifying])
        for (i, _), t in zip(verifying, tokens):
            out[i] = t
    if plain:
        picked = sample(logits[[r for _, r in plain]], [chunks[i].seq for i, _ in plain])
        for (i, _), token in zip(plain, picked):
            out[i] = [token]
    return out
