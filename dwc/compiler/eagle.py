"""The EAGLE head as a speculation candidate: training on the target's own outputs, the
measurement at the evaluation positions, its cost ratio (docs/SPECULATION.md, "eagle").

Training (`train_head`) reads the target's outputs over the same windows the draft model
is distilled on (calibration text and the target's own continuations: on-policy). Each
step runs the target once (its tapped layers, last layer and logits) and the head twice:
  1. teacher-forced: at every position the feature before it is the target's own g;
  2. the "training-time test" of EAGLE-3: the feature before position p is the head's
     own output o_{p-1} from step 1, as when drafting the second token of a chain; the
     query at p sees the step-1 keys before p and itself (`two_step_mask`), as the
     runtime's chain sees the head's cache and its own entry.
The loss at both steps: KL(target || head) on the next-token distribution plus
`hidden_weight` times the head output's squared distance to the target's last layer
output (relative to that output's mean square), EAGLE's feature regression.
"""

from __future__ import annotations

import copy
import math
import time

import torch

from dwc.compiler import speculation
from dwc.model.eagle_head import EagleHead, tapped_forward


def two_step_mask(n: int) -> torch.Tensor:
    """[1, 1, 2n, 2n] bool, True where a query may attend: rows 0..n-1 (step 1) causally
    over step 1; row n + p (step 2 at position p) over step-1 keys j < p and itself."""
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    top = torch.cat([causal, torch.zeros(n, n, dtype=torch.bool)], 1)
    bottom = torch.cat([causal.tril(-1), torch.eye(n, dtype=torch.bool)], 1)
    return torch.cat([top, bottom], 0)[None, None]


def head_loss(head: EagleHead, target, ids: torch.Tensor, hidden_weight: float) -> torch.Tensor:
    """The two-step loss on windows ids [b, T] (module docstring)."""
    b, n = ids.shape
    with torch.no_grad():
        tapped, last, logits = tapped_forward(target, ids, head.taps)
        p = torch.log_softmax(logits.float(), -1)                          # [b, T, V]
        prob = p.exp()
        entropy = (prob * p).sum(-1).mean()  # KL = this - sum(prob * q): computed once
        last = last.float()
        scale = last.pow(2).mean()
    feats = head.features(tapped.float())                                   # [b, T, h]
    pos = torch.arange(n, device=ids.device)[None].expand(b, -1)
    o1 = head(ids, feats, pos)                                              # [b, T, h]
    f2 = torch.cat([torch.zeros_like(o1[:, :1]), o1[:, :-1]], 1)
    mask = two_step_mask(n).to(ids.device)
    o2 = head(torch.cat([ids, ids], 1), torch.cat([feats, f2], 1), torch.cat([pos, pos], 1),
              mask)[:, n:]
    loss = 0.0
    for o in (o1, o2):
        q = torch.log_softmax(head.logits(o), -1)
        kl = entropy - (prob * q).sum(-1).mean()
        loss = loss + kl + hidden_weight * (o - last).pow(2).mean() / scale
    return loss / 2


def train_head(head: EagleHead, target, windows: list, options, ctx) -> dict:
    """AdamW on the head's own weights for options.eagle_steps steps (cosine decay to a
    tenth), or until options.eagle_max_seconds; returns what the training did."""
    from dwc.quality.data import batches

    groups = list(batches(windows, options.batch_size))
    steps = options.eagle_steps
    opt = torch.optim.AdamW(head.parameters(), lr=options.eagle_lr, weight_decay=0.0)
    decay = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
    gen = torch.Generator().manual_seed(0)
    head.train()
    losses, t0, done = [], time.perf_counter(), 0
    with ctx.reporter.progress("training the EAGLE head", steps) as advance:
        for step in range(steps):
            if time.perf_counter() - t0 > options.eagle_max_seconds:
                break
            ids = torch.stack(groups[int(torch.randint(len(groups), (1,), generator=gen))])
            loss = head_loss(head, target, ids.to(target.device), options.eagle_hidden_weight)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            opt.step()
            decay.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            done = step + 1
            advance(1, f"loss {loss.item():.3f}" if step % 10 == 0 else None)
    head.eval()
    head.requires_grad_(False)
    first, last = losses[:10], losses[-10:]
    return {"steps": done, "seconds": round(time.perf_counter() - t0, 1),
            "loss_first": round(sum(first) / len(first), 4),
            "loss_last": round(sum(last) / len(last), 4)}


class _Drafts:
    """propose(prefix, k) for speculation.accepted_counts: the head's greedy chain after
    a prefix of one of the measured sequences. The target runs once over each sequence
    (its tapped layers); a prefix seq[:pos] shares its sequence's storage, which finds
    that run (causal: the prefix's outputs are the first pos rows)."""

    def __init__(self, head: EagleHead, target, starts: list):
        self.head, self.tapped = head, {}
        with torch.inference_mode():
            for seq, _ in starts:
                if seq.data_ptr() not in self.tapped:
                    ids = seq.to(target.device)[None]
                    self.tapped[seq.data_ptr()] = tapped_forward(target, ids, head.taps)[0][0]

    def __call__(self, prefix: torch.Tensor, k: int) -> list[int]:
        tapped = self.tapped[prefix.data_ptr()][:len(prefix)]
        return self.head.draft(prefix.to(tapped.device), tapped, k)


def measure_head(head: EagleHead, target, starts: list, ctx, options, trained: dict) -> dict:
    """The head as a candidate, at the same positions as the others."""
    propose = _Drafts(head, target, starts)
    with ctx.reporter.progress("measuring the EAGLE head", len(starts)) as advance:
        accepted = speculation.accepted_counts(propose, starts, options.max_k, advance)
    info = speculation.candidate("eagle", accepted, options.max_k, cost_ratio(head, target, ctx))
    return {**info, "params": sum(p.numel() for p in head.parameters()),
            "taps": list(head.taps), "training": trained}


def cost_ratio(head: EagleHead, target, ctx) -> float:
    """A head step over a target step. On the GPU the head's step is timed in dwc's
    runtime against the target's graph step (the target keeps the head's tapped layers
    in its CUDA graphs, docs/SPECULATION.md). Elsewhere: the ratio of weight bytes read
    per token (the head's own weights, the final norm and the LM head, in bf16, over the
    target's; the embedding reads one row on both sides)."""
    if torch.cuda.is_available() and str(target.device).startswith("cuda"):
        return _timed_ratio(head, target, ctx)
    s = head.shared
    shared = s.lm_head.weight.numel() + s.norm.weight.numel()
    head_bytes = 2 * (sum(p.numel() for p in head.parameters()) + shared)
    return head_bytes / speculation.target_bytes(target, ctx)


def _timed_ratio(head: EagleHead, target, ctx) -> float:
    """Batch-1 decode steps in dwc's ModelRunner: the head's (in the target's dtype) over
    the target's graph step (its kernels and KV cache dtype)."""
    from dwc.perf.calibration import decode_step_seconds
    from dwc.runtime.eagle import head_runner
    from dwc.runtime.model_runner import ModelRunner

    quantized = ctx.artifacts.quantized
    kv = ctx.target.kv_cache_dtype if ctx.target.kv_cache_dtype == "fp8_e4m3" else None
    folder = quantized.folder if quantized is not None else None
    graph = decode_step_seconds(ModelRunner(target, 64, 16, "cuda", folder, kv,
                                            graph_tokens=1))
    # A copy of the head's own modules (not the target's it shares): head_runner converts
    # in place, and the head stays float32. It runs in the target's dtype, as
    # EagleProposer.load serves it.
    shared, head.shared = head.shared, None
    try:
        twin = copy.deepcopy(head)
    finally:
        head.shared = shared
    dtype = target.model.embed_tokens.weight.dtype
    runner = head_runner(twin, target, 64, 16, "cuda", dtype)
    return decode_step_seconds(runner) / graph
