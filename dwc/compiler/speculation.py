"""Measuring speculation candidates on evaluation text and choosing one (docs/SPECULATION.md).

Every candidate (a draft model, n-gram lookup) is measured on what serving drafts after:
a prompt from the evaluation text and the target's own greedy continuation of it. At the
same positions of those sequences each candidate proposes up to max_k tokens after the
text so far; as the text is the target's greedy output, the target confirms exactly the
proposed tokens that agree with the text that follows, up to the first that does not
(no verification forward is needed).
From those counts a, for each K: tau(K) = 1 + mean(min(a, K)) tokens per target step, and
the projected speedup tau(K) / (1 + K c), c the candidate's cost per drafted token
relative to a target step. Resampling the positions (a bootstrap with a fixed seed) gives
a 95% interval on tau and on the speedup at the chosen K, and how often that K would be
chosen again ("k_stability"). The winner is the candidate with the highest projected
speedup whose interval lies above 1; when none does, speculation is off ("none").
"""

from __future__ import annotations

from typing import Callable

import torch

from dwc.constants import SPEC_BOOTSTRAP, SPEC_NEW_TOKENS, SPEC_POSITION_STRIDE, SPEC_PROMPT_TOKENS

Propose = Callable[[torch.Tensor, int], list]  # (prefix ids [n], k) -> up to k token ids


def positions(target, windows: list[torch.Tensor], count: int, max_k: int
              ) -> list[tuple[torch.Tensor, int]]:
    """Up to `count` (sequence, position) pairs: each window's first SPEC_PROMPT_TOKENS
    (at most half of it) continued greedily by the target for SPEC_NEW_TOKENS, and every
    SPEC_POSITION_STRIDE-th position from the prompt's end on with max_k tokens after it,
    window by window."""
    starts, seqs = [], _continuations(target, windows)
    for prompt_len, seq in seqs:
        starts += [(seq, pos) for pos in range(prompt_len, len(seq) - max_k + 1,
                                               SPEC_POSITION_STRIDE)]
    return starts[:count]


def _continuations(target, windows: list[torch.Tensor]) -> list[tuple[int, torch.Tensor]]:
    by_length: dict[int, list] = {}
    for w in windows:
        by_length.setdefault(min(SPEC_PROMPT_TOKENS, len(w) // 2), []).append(w)
    out = []
    with torch.inference_mode():
        for n, group in by_length.items():
            prompts = torch.stack([w[:n] for w in group]).to(target.device)
            seqs = target.generate(prompts, do_sample=False, max_new_tokens=SPEC_NEW_TOKENS,
                                   min_new_tokens=SPEC_NEW_TOKENS,  # no end-of-text padding
                                   attention_mask=torch.ones_like(prompts), pad_token_id=0)
            out += [(n, s.cpu()) for s in seqs]
    return out


def accepted_counts(propose: Propose, starts: list, max_k: int, advance) -> list[int]:
    """For each (sequence, position): how many of the candidate's proposed tokens the
    target's greedy decoding confirms: those equal to the sequence's next tokens, in order
    (0 when it proposes nothing)."""
    accepted = []
    with torch.inference_mode():
        for seq, pos in starts:
            drafted = [int(t) for t in propose(seq[:pos], max_k)][:max_k]
            follows = seq[pos:pos + len(drafted)].tolist()
            agree = [d == t for d, t in zip(drafted, follows)] + [False]
            accepted.append(agree.index(False))
            advance(1)
    return accepted


def candidate(method: str, accepted: list[int], max_k: int, cost: float) -> dict:
    """The candidate's table over K = 1..max_k, its best K, and the intervals there.
    Projected speedup: tau / (1 + K * cost), `cost` a draft step over a target step (a
    verification step costs a plain one: memory-bound at batch 1)."""
    a = torch.tensor(accepted, dtype=torch.float64)
    ks = torch.arange(1, max_k + 1, dtype=torch.float64)
    tau = 1 + torch.minimum(a[:, None], ks).mean(0)                        # [K]
    reached = torch.stack([(a >= k - 1).sum() for k in ks]).clamp(min=1)
    alpha = torch.stack([(a >= k).sum() for k in ks]) / reached
    speedup = tau / (1 + ks * cost)
    best = int(speedup.argmax())
    k = best + 1
    boot_tau, stability = _bootstrap(a, ks, cost, best)
    lo, hi = (float(x) for x in torch.quantile(boot_tau, torch.tensor([0.025, 0.975],
                                                                       dtype=torch.float64)))
    return {"method": method, "k": k, "mean_accepted_tokens": round(float(tau[best]), 4),
            "tau_ci95": [round(lo, 4), round(hi, 4)],
            "acceptance_rate": round(float(alpha[:k].mean()), 4),
            "cost_ratio": round(cost, 4), "projected_speedup": round(float(speedup[best]), 4),
            "speedup_ci95": [round(lo / (1 + k * cost), 4), round(hi / (1 + k * cost), 4)],
            "k_stability": round(stability, 4), "positions": len(accepted),
            "per_k": {"k": [int(x) for x in ks], "alpha": _rounded(alpha),
                      "tau": _rounded(tau), "speedup": _rounded(speedup)}}


def _bootstrap(a: torch.Tensor, ks: torch.Tensor, cost: float, best: int):
    """tau at the best K over resampled positions, and the share of resamples whose own
    best K is the same one."""
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(len(a), (SPEC_BOOTSTRAP, len(a)), generator=gen)
    taus = 1 + torch.minimum(a[idx][..., None], ks).mean(1)                # [B, K]
    again = (taus / (1 + ks * cost)).argmax(1) == best
    return taus[:, best], float(again.double().mean())


def measure_ngram(starts, ctx, max_k: int) -> dict:
    """n-gram lookup as a candidate: what the runtime's proposer drafts after each position."""
    from dwc.runtime.ngram import lookup

    with ctx.reporter.progress("measuring n-gram lookup", len(starts)) as advance:
        accepted = accepted_counts(lambda prefix, k: lookup(prefix.tolist(), k), starts,
                                   max_k, advance)
    return candidate("ngram", accepted, max_k, 0.0)


def choose(candidates: list[dict], forced: str | None = None) -> dict:
    """The winner: the highest projected speedup among candidates whose speedup interval
    lies above 1; else "none" (every candidate is kept in the table, with why it lost).
    `forced` (distill-draft.ship): that method's candidate, whatever its projection."""
    paying = [c for c in candidates if c["speedup_ci95"][0] > 1.0]
    if forced:
        winner = next(c for c in candidates if c["method"] == forced)
    else:
        winner = max(paying, key=lambda c: c["projected_speedup"]) if paying else None
    for c in candidates:
        c["chosen"] = c is winner
        if c is not winner:
            c["why_not"] = (f"distill-draft.ship is {forced}" if forced else
                            "its speedup interval reaches 1 or below"
                            if c not in paying else
                            f"projected speedup {c['projected_speedup']} below "
                            f"{winner['method']}'s {winner['projected_speedup']}")
    table = [{k: v for k, v in c.items() if k != "per_k"} for c in candidates]
    if winner is None:
        return {"method": "none", "k": 0, "projected_speedup": 1.0, "candidates": table}
    chosen = {k: v for k, v in winner.items() if k not in ("chosen", "why_not")}
    return {**chosen, "candidates": table}


def _rounded(x: torch.Tensor) -> list[float]:
    return [round(float(v), 4) for v in x]


def target_bytes(target, ctx) -> int:
    """Weight bytes the target reads per decode step, for a CPU build's cost ratios: the
    quantized weights' when the build quantized it, else its parameters'."""
    quantized = ctx.artifacts.quantized
    if quantized is not None:
        return quantized.summary["weight_bytes"]
    return sum(p.numel() * p.element_size() for p in target.parameters())
