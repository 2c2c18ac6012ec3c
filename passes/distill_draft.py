"""`distill-draft`: measure the ways to speculate and choose one (docs/SPECULATION.md).

Candidates: a draft model, an EAGLE head (one decoder layer over the target's own hidden
states, dwc/compiler/eagle.py) and n-gram lookup in the text itself (no training),
against not speculating. The draft model, with `draft: auto`, keeps the target's width,
tokenizer, embedding, final norm and LM head, and every (L / n)-th of its L decoder
layers, n = max(1, L // 8) (Llama-3-8B: 4 of 32 layers), initialised from those weights
and distilled from the optimized target's full next-token distribution (KL(target ||
draft)) on the calibration windows plus text the target itself generates from
calibration prompts (on-policy data, as DistillSpec recommends); `draft: <path>`
measures an existing draft (same vocabulary required) instead. The EAGLE head is trained
on the same windows against the optimized target's logits and last hidden state. The
`candidates` option narrows what is measured (`[ngram]`: nothing is trained).

Each candidate is measured at the same evaluation positions (dwc/compiler/speculation.py):
acceptance for K = 1..max_k, tau, and the cost ratio c of a drafted token to a target
step (the draft: timed on the GPU when there is one, else the ratio of weight bytes read
per token; n-gram lookup: 0, a dictionary lookup on the host). The winner, its K and the
whole table go to the manifest's `draft` and reports/draft.json; `draft: none` leaves
the pass out.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from dwc.compiler import eagle, speculation
from dwc.config import option, positive
from dwc.quality.data import token_windows
from dwc.errors import BadInput, BuildFileError
from dwc.bundle.hashing import sha256_file
from dwc.passes.base import Pass, PassResult
from dwc.compiler.reports import json_bytes, line_chart

DRAFT_DIR = "draft-model"
HEAD_DIR = "eagle-head"
ON_POLICY_BATCH = 128  # prompts the target continues at once
INFO = "draft.json"
CANDIDATES = ("draft_model", "eagle", "ngram")


@dataclass
class DistillOptions:
    layers: int = option(0, help="draft decoder layers (0: the size rule, max(1, L // 8))")
    steps: int = option(150, help="distillation steps")
    lr: float = option(1e-3, help="AdamW peak learning rate (cosine decay to a tenth)")
    windows: int = option(512, help="calibration-file windows distilled on (as many as the "
                                    "file holds, up to this; at least calibration.samples)")
    batch_size: int = option(8, help="sequences per step")
    on_policy: int = option(16, help="calibration prompts the target continues for on-policy data")
    on_policy_tokens: int = option(64, help="tokens the target generates per on-policy prompt")
    max_k: int = option(8, help="largest number of drafted tokens measured")
    positions: int = option(256, help="evaluation positions where each candidate is measured "
                                      "(every 16th position of the evaluation windows)")

    candidates: list[str] = option(["draft_model", "eagle", "ngram"],
                              help="methods measured (draft_model, eagle, ngram); the winner is "
                                   "chosen among them and not speculating")
    eagle_steps: int = option(200, help="EAGLE head training steps")
    eagle_lr: float = option(2e-3, help="EAGLE head AdamW peak learning rate")
    eagle_hidden_weight: float = option(0.5, help="weight of the EAGLE head's hidden-state "
                                                  "regression beside its KL to the target")
    eagle_max_seconds: float = option(300.0, help="EAGLE head training stops after this "
                                                  "many seconds, whatever eagle_steps says")
    ship: str = option("auto", help="auto: the measured winner (or none); a candidate's name: "
                                    "that one, whatever its projection (to measure it served)")

    def validate(self, path: str) -> None:
        positive(self, path, "steps", "lr", "batch_size", "max_k", "positions", "windows",
                 "eagle_steps", "eagle_lr", "eagle_max_seconds")
        if self.eagle_hidden_weight < 0:
            raise BuildFileError(f"{path}.eagle_hidden_weight: {self.eagle_hidden_weight}: "
                                 f"must be 0 or more")
        unknown = [c for c in self.candidates if c not in CANDIDATES]
        if unknown or not self.candidates:
            raise BuildFileError(f"{path}.candidates: {unknown or 'empty'}: choose from "
                           f"{', '.join(CANDIDATES)}")
        if self.ship != "auto" and self.ship not in self.candidates:
            raise BuildFileError(f"{path}.ship: {self.ship!r}: auto or one of the "
                                 f"candidates ({', '.join(self.candidates)})")


class DistillDraft(Pass):
    name = "distill-draft"
    description = ("Measure speculation on evaluation text: a draft model (the target's "
                   "embedding, head and every 8th layer, distilled from its logits), an EAGLE "
                   "head (one layer over the target's hidden states) and n-gram lookup, for "
                   "K = 1..8; choose the method and K by projected speedup.")
    reads = ("model", "reference", "tokenizer")
    writes = ("draft", "draft_model")
    Options = DistillOptions
    cacheable = True

    def key_material(self, ctx, options):
        c, e, d = ctx.build.calibration, ctx.build.evaluation, ctx.build.draft
        return {"calibration": [sha256_file(c.data), c.samples, c.seq_len],
                "evaluation": [sha256_file(e.data), e.samples, e.seq_len], "draft": str(d)}

    def run(self, ctx, options) -> PassResult:
        target, setting = ctx.artifacts.model, ctx.build.draft
        e = ctx.build.evaluation
        starts = speculation.positions(target, token_windows(
            e.data, ctx.artifacts.tokenizer, e.samples, e.seq_len), options.positions, options.max_k)
        measured, draft, head, windows = [], None, None, None
        wanted = _candidates(options, ctx)
        if "draft_model" in wanted:
            if isinstance(setting, Path):
                draft = load_existing(setting, ctx)
            else:
                draft = make_draft(ctx.artifacts.reference, options.layers)
                windows = training_windows(ctx, target, options)
                train(draft, target, windows, options, ctx)
            measured.append(measure(draft, target, starts, ctx, options))
        if "eagle" in wanted:
            head = eagle.EagleHead.for_target(target, ctx.artifacts.reference)
            trained = eagle.train_head(head, target, windows or training_windows(
                ctx, target, options), options, ctx)
            measured.append(eagle.measure_head(head, target, starts, ctx, options, trained))
        if "ngram" in wanted:
            measured.append(speculation.measure_ngram(starts, ctx, options.max_k))
        forced = None if options.ship == "auto" else options.ship
        info = {**speculation.choose(measured, forced), "note": NOTE}
        series = {f"{c['method']}: {name}": c["per_k"][key] for c in measured
                  for name, key in (("tau", "tau"), ("projected speedup", "speedup"))}
        png = line_chart(series, title="Speculation: tokens per target step and projected speedup",
                         xlabel="K - 1 (drafted tokens minus one)", ylabel="")
        metrics = {k: info.get(k) for k in ("method", "k", "mean_accepted_tokens",
                                             "projected_speedup", "positions")}
        chosen = {"draft_model": draft, "eagle": head}.get(info["method"])
        return PassResult(outputs={"draft": info, "draft_model": chosen}, metrics=metrics,
                          reports={"draft.json": json_bytes({**info, "per_candidate": measured}),
                                   "draft.png": png})

    def save(self, outputs, folder: Path) -> None:
        chosen = outputs["draft_model"]
        if isinstance(chosen, eagle.EagleHead):
            chosen.save(folder / HEAD_DIR)
        elif chosen is not None:
            chosen.save_pretrained(folder / DRAFT_DIR)
        (folder / INFO).write_bytes(json_bytes(outputs["draft"]))

    def load(self, folder: Path, ctx) -> dict:
        from transformers import AutoModelForCausalLM

        from dwc.model.eagle_head import load_head

        info, model = json.loads((folder / INFO).read_text()), None
        if (folder / HEAD_DIR).is_dir():
            model = load_head(folder / HEAD_DIR, ctx.artifacts.model).float()
        elif (folder / DRAFT_DIR).is_dir():
            model = AutoModelForCausalLM.from_pretrained(folder / DRAFT_DIR).to(ctx.compute_device)
            model = model.eval()
        return {"draft": info, "draft_model": model}


NOTE = ("greedy acceptance at evaluation positions; speedup projected as tau / (1 + K c), "
        "not measured; the verification's K extra tokens are taken as free (batch 1, "
        "memory-bound); `tune` weighs speculation at the serving concurrency")


def _candidates(options, ctx) -> list[str]:
    """The methods to measure. An EAGLE head is served by dwc's runtime only (no other
    engine reads its layout: docs/SPECULATION.md), so other backends leave it out."""
    from dwc.formats.manifest import RUNTIME_BACKEND

    if ctx.target.backend == RUNTIME_BACKEND:
        return list(options.candidates)
    wanted = [c for c in options.candidates if c != "eagle"]
    if not wanted:
        raise BuildFileError(f"passes.distill-draft.candidates: [eagle]: an EAGLE head is "
                             f"served by dwc's runtime only, not by {ctx.target.backend}")
    return wanted


def make_draft(reference, layers: int):
    """The target's embedding, final norm, head and every (L / n)-th layer, in float32."""
    total = reference.config.num_hidden_layers
    n = layers or max(1, total // 8)
    keep = [round(i * total / n) for i in range(n)]
    draft = copy.deepcopy(reference).float()
    draft.model.layers = torch.nn.ModuleList([draft.model.layers[i] for i in keep])
    for i, layer in enumerate(draft.model.layers):
        layer.self_attn.layer_idx = i
    draft.config.num_hidden_layers = n
    if hasattr(draft.config, "layer_types") and draft.config.layer_types:
        draft.config.layer_types = draft.config.layer_types[:n]
    draft.requires_grad_(True)
    return draft


def load_existing(path: Path, ctx):
    from transformers import AutoModelForCausalLM

    from dwc.model.checkpoint import model_info

    info = model_info(path)
    if info.vocab_size != ctx.info.vocab_size:
        raise BadInput(f"draft: {path} has a vocabulary of {info.vocab_size} tokens, the model "
                       f"{ctx.info.vocab_size}; a draft must share the tokenizer")
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(
        ctx.compute_device).float()


def training_windows(ctx, target, options) -> list:
    """Calibration windows, plus the target's own continuations of their beginnings."""
    c = ctx.build.calibration
    windows = token_windows(c.data, ctx.artifacts.tokenizer, max(options.windows, c.samples),
                            c.seq_len)
    prompts = [w[:32] for w in windows[:options.on_policy] if len(w) >= 32]
    torch.manual_seed(0)  # the on-policy samples, hence the draft, are reproducible
    for i in range(0, len(prompts), ON_POLICY_BATCH):
        group = torch.stack(prompts[i:i + ON_POLICY_BATCH]).to(target.device)
        with torch.inference_mode():
            out = target.generate(group, do_sample=True, max_new_tokens=options.on_policy_tokens,
                                  top_k=0, pad_token_id=0, attention_mask=torch.ones_like(group))
        windows += [row.cpu() for row in out]
    return windows


def train(draft, target, windows, options, ctx) -> None:
    from dwc.quality.data import batches

    groups = list(batches(windows, options.batch_size))
    opt = torch.optim.AdamW(draft.parameters(), lr=options.lr, weight_decay=0.0)
    decay = torch.optim.lr_scheduler.LambdaLR(  # cosine from lr to lr / 10
        opt, lambda step: 0.1 + 0.45 * (1 + math.cos(math.pi * step / options.steps)))
    gen = torch.Generator().manual_seed(0)
    draft.train()
    with ctx.reporter.progress("distilling the draft", options.steps) as advance:
        for step in range(options.steps):
            ids = torch.stack(groups[int(torch.randint(len(groups), (1,), generator=gen))])
            ids = ids.to(draft.device)
            with torch.no_grad():
                p = torch.log_softmax(target(ids).logits.float(), -1)           # [b, s, V]
            q = torch.log_softmax(draft(ids).logits.float(), -1)
            loss = (p.exp() * (p - q)).sum(-1).mean()                           # KL(p || q)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
            opt.step()
            decay.step()
            opt.zero_grad(set_to_none=True)
            advance(1, f"KL {loss.item():.3f}" if step % 10 == 0 else None)
    draft.eval()
    draft.requires_grad_(False)


def measure(draft, target, starts, ctx, options) -> dict:
    """The draft model as a candidate: K tokens drafted greedily after each position."""
    def propose(prefix, k):  # k greedy tokens
        ids = prefix.to(draft.device)[None]
        out = draft.generate(ids, do_sample=False, max_new_tokens=k, min_new_tokens=k,
                             attention_mask=torch.ones_like(ids), pad_token_id=0)
        return out[0, len(prefix):].tolist()

    with ctx.reporter.progress("measuring the draft model", len(starts)) as advance:
        accepted = speculation.accepted_counts(propose, starts, options.max_k, advance)
    info = speculation.candidate("draft_model", accepted, options.max_k,
                                 cost_ratio(draft, target, ctx))
    return {**info, "params": sum(p.numel() for p in draft.parameters()),
            "layers": draft.config.num_hidden_layers}


def cost_ratio(draft, target, ctx) -> float:
    """Draft step / target step: timed in dwc's runtime on the GPU (the runtime and the
    hardware that will serve them), else weight bytes read per token."""
    if torch.cuda.is_available() and str(target.device).startswith("cuda"):
        return _timed_ratio(draft, target, ctx)
    # Decode reads every weight but the embedding (one row); the draft runs in bf16.
    embed = draft.model.embed_tokens.weight.numel()
    draft_bytes = 2 * (sum(p.numel() for p in draft.parameters()) - embed)
    return draft_bytes / speculation.target_bytes(target, ctx)


def _timed_ratio(draft, target, ctx) -> float:
    """Batch-1 decode steps of the bf16 draft over those of the target with its GPU
    kernels and KV cache dtype, both in dwc's ModelRunner and CUDA graphs, as they
    serve."""
    from dwc.perf.calibration import decode_step_seconds
    from dwc.runtime.model_runner import ModelRunner

    quantized = ctx.artifacts.quantized
    kv = ctx.target.kv_cache_dtype if ctx.target.kv_cache_dtype == "fp8_e4m3" else None
    target_runner = ModelRunner(target, 64, 16, "cuda",
                                quantized.folder if quantized is not None else None, kv,
                                graph_tokens=1)
    draft_runner = ModelRunner(copy.deepcopy(draft).to(torch.bfloat16), 64, 16, "cuda",
                               graph_tokens=1)
    return decode_step_seconds(draft_runner) / decode_step_seconds(target_runner)
