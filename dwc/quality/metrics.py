"""Quality metrics of an optimized model against its reference, token by token.

Perplexity of each (exp of the mean next-token negative log-likelihood), KL divergence
KL(reference || optimized) of the next-token distributions, and top-1 agreement (how often
both pick the same most-likely token). All in float64 accumulators over float32 log-probs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dwc.quality.data import batches


@dataclass
class QualityTotals:
    tokens: int = 0
    nll_ref: float = 0.0
    nll_opt: float = 0.0
    kl: float = 0.0
    kl_max: float = 0.0
    agree: int = 0
    window_ppl_ref: list = field(default_factory=list)
    window_ppl_opt: list = field(default_factory=list)

    def update(self, ref_logits, opt_logits, ids) -> None:
        """ref_logits, opt_logits: [batch, seq, vocab]; ids: [batch, seq] input token ids."""
        import torch

        targets = ids[:, 1:].to(ref_logits.device)                    # [b, s-1]
        lp_ref = torch.log_softmax(ref_logits[:, :-1].float(), -1)    # [b, s-1, V]
        lp_opt = torch.log_softmax(opt_logits[:, :-1].float(), -1)
        nll_ref = -lp_ref.gather(-1, targets[..., None])[..., 0]      # [b, s-1]
        nll_opt = -lp_opt.gather(-1, targets[..., None])[..., 0]
        kl = (lp_ref.exp() * (lp_ref - lp_opt)).sum(-1).clamp_min(0)  # [b, s-1]
        self.tokens += targets.numel()
        self.nll_ref += nll_ref.double().sum().item()
        self.nll_opt += nll_opt.double().sum().item()
        self.kl += kl.double().sum().item()
        self.kl_max = max(self.kl_max, kl.max().item())
        self.agree += (lp_ref.argmax(-1) == lp_opt.argmax(-1)).sum().item()
        self.window_ppl_ref += nll_ref.double().mean(-1).exp().tolist()
        self.window_ppl_opt += nll_opt.double().mean(-1).exp().tolist()

    def result(self) -> dict:
        base = math.exp(self.nll_ref / self.tokens)
        opt = math.exp(self.nll_opt / self.tokens)
        delta = (opt - base) / base * 100.0
        return {
            "metric": "perplexity", "baseline": round(base, 6), "optimized": round(opt, 6),
            "delta_pct": round(delta, 4),
            "kl_divergence": round(self.kl / self.tokens, 8), "kl_max": round(self.kl_max, 6),
            "top1_agreement": round(self.agree / self.tokens, 6), "tokens": self.tokens,
        }


def compare(reference, optimized, windows, batch_size: int, advance=lambda n: None) -> QualityTotals:
    """Run both models over the windows; `reference` / `optimized` map ids -> logits."""
    import torch

    totals = QualityTotals()
    with torch.inference_mode():
        for group in batches(windows, batch_size):
            ids = torch.stack(group)                                  # [b, s]
            totals.update(reference(ids), optimized(ids), ids)
            advance(len(group))
    return totals


def hf_logits(model):
    """A transformers causal LM as an ids -> logits function (logits stay on the model's
    device, so two models on one GPU are compared without copies to the host)."""
    def fn(ids):
        return model(ids.to(model.device)).logits
    return fn
