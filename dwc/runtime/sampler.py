"""Next-token sampling: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

import torch

from dwc.runtime.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits: [len(seqs), vocab] float32 -> one token id per sequence."""
    out = []
    for row, seq in zip(logits, seqs):
        p = seq.params
        if p.temperature <= 0:
            out.append(int(row.argmax()))
            continue
        probs = torch.softmax(filter_logits(row / p.temperature, p.top_k, p.top_p), dim=-1)
        if seq.generator is None and p.seed is not None:
            seq.generator = torch.Generator(device=row.device).manual_seed(p.seed)
        out.append(int(torch.multinomial(probs, 1, generator=seq.generator)))
    return out


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
