"""Next-token sampling: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

import torch

from dwc.runtime.sequence import SamplingParams, Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits: [len(seqs), vocab] float32 -> one token id per sequence."""
    greedy = logits.argmax(-1).tolist()  # one device sync for every greedy request
    if all(seq.params.temperature <= 0 for seq in seqs):
        return greedy  # no per-row tensor views: they cost microseconds each at batch 256
    return [g if seq.params.temperature <= 0 else draw(distribution(row, seq.params), seq)
            for row, seq, g in zip(logits, seqs, greedy)]


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
        sorted_logits, order = torch.sort(logits, descending=True)
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
