"""`tune`: choose the serving configuration against the SLO with the cost model, and say
what it costs (issue 9; dwc/perf/costmodel.py).

Candidates: the concurrency limit (max_num_seqs: powers of two up to the KV plan's) and,
when the bundle has a draft, speculation on or off. Every candidate already meets the
quality budget (`evaluate` ran before). For each, the model predicts the highest request
rate whose p99 time per output token and time to first token meet `slo`
(target_latency_ms, target_ttft_ms) for requests of `slo.prompt_tokens` /
`slo.output_tokens`; the pick is the candidate with the highest such rate, which is also
the cheapest per token on one device. The plan's max_num_seqs becomes the pick's. When
one device cannot reach `slo.target_rps`, the report says how many replicas can; when no
candidate meets the latency limits at any rate, the build says which limit and by how
much, and exits 4 with `slo.enforce: true`.

When the target's GPU is the one present, the model is calibrated first: dwc's engine
times decode steps and prompt arrivals on it (dwc/perf/calibration.py), and after the choice
`dwc bench`'s online measurement runs the chosen configuration at the chosen rate; its
p99 figures go to the manifest's `slo.measured` and decide `meets_slo`. Elsewhere the
figures are roofline predictions from the target's YAML (labelled so).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass

from dwc.config import option
from dwc.perf.costmodel import Calibration, Machine, ModelFigures, max_rps, predict, replicas, \
    usd_per_million_tokens, weight_bytes
from dwc.errors import SloNotMet
from dwc.formats.manifest import speculation
from dwc.passes.base import Pass, PassResult
from dwc.compiler.reports import json_bytes, line_chart

GB = 1e9
SUSTAINED = 0.9  # the confirming run must complete requests at 90% of the offered rate


@dataclass
class TuneOptions:
    calibrate: bool = option(True, help="on the target's GPU: time the engine first, and "
                                        "measure the choice at its rate")
    confirm_requests: int = option(200, help="requests of the confirming measurement")
    warmup_requests: int = option(50, help="requests sent first and not measured (at least "
                                           "those of two predicted request lifetimes)")

    def validate(self, path: str) -> None:
        from dwc.config import positive

        positive(self, path, "confirm_requests")


class Tune(Pass):
    name = "tune"
    description = ("Predict p99 TPOT / TTFT and the sustainable request rate of each serving "
                   "configuration with the cost model (calibrated on the target's GPU when "
                   "present, p99s by simulation); pick the one that meets the SLO most "
                   "cheaply and confirm it there with dwc bench; report replicas and $ per "
                   "million tokens (exit 4 if the SLO is not met and slo.enforce).")
    reads = ("kv_plan", "model", "tokenizer")
    optional_reads = ("quantized", "draft", "fusion")
    writes = ("kv_plan", "tuning")
    Options = TuneOptions

    def run(self, ctx, options) -> PassResult:
        slo, hw = ctx.build.slo, ctx.target.hardware
        plan = dict(ctx.artifacts.kv_plan)
        prompt, output = (slo.prompt_tokens, slo.output_tokens) if slo else (512, 128)
        calibrating = options.calibrate and on_target_gpu(hw) and \
            _longest(plan, prompt, output) <= ctx.artifacts.model.config.max_position_embeddings
        engine = _engine(ctx, plan, prompt, output) if calibrating else None
        try:
            calibration, note = _calibrate(engine, plan, prompt, output) if engine else (None, None)
            machine = Machine(hw.memory_bandwidth_gbs * GB, max(hw.peak_tflops.values()) * 1e12,
                              hw.usd_per_hour, calibration=calibration)
            rows = [_candidate(machine, _figures(ctx, plan, draft), seqs, draft, slo, prompt,
                               output)
                    for seqs in _powers(plan["max_num_seqs"])
                    for draft in ([False, True] if speculation(ctx.artifacts.draft) else [False])]
            best = max(rows, key=lambda r: (r["max_rps"], -r["max_num_seqs"]))
            tuning = _decision(best, rows, slo, ctx.target.name, prompt, output, hw.usd_per_hour)
            if calibration:
                tuning["calibration"] = calibration.as_dict()
                tuning["label"] = f"predicted by the cost model calibrated on {calibration.device}"
                _confirm(engine, tuning, best, slo, prompt, output, options)
            elif note:
                tuning["calibration_failed"] = note
        finally:
            if engine is not None:
                engine.release()
        plan["max_num_seqs"] = best["max_num_seqs"]
        png = _load_plot(machine, _figures(ctx, plan, best["draft"]), best, slo, prompt, output)
        if slo and slo.enforce and not tuning["meets_slo"]:
            raise SloNotMet(f"slo: {tuning['reason']}")
        return PassResult(outputs={"kv_plan": plan, "tuning": tuning},
                          metrics={"max_num_seqs": best["max_num_seqs"], "draft": best["draft"],
                                   "predicted_max_rps": best["max_rps"],
                                   "usd_per_million_output_tokens":
                                       tuning["predicted"]["usd_per_million_output_tokens"],
                                   "meets_slo": tuning["meets_slo"]},
                          reports={"tuning.json": json_bytes(tuning), "tuning.png": png})


def on_target_gpu(hw) -> bool:
    """A CUDA GPU is present and it is the target's (its name's words are in the target's
    hardware name: "NVIDIA H200" in "NVIDIA H200 141GB")."""
    import torch

    if not torch.cuda.is_available():
        return False
    present = torch.cuda.get_device_name(0).lower().split()
    return all(word in hw.name.lower().split() for word in present)


def _engine(ctx, plan: dict, prompt: int, output: int):
    """dwc's engine on the optimized model (a folder of its files and the tokenizer),
    sized for the calibration: every concurrency up to the plan's, each with a prompt."""
    import os

    from dwc.runtime.engine import Engine, EngineConfig

    folder = ctx.workdir / "tune-model"
    shutil.rmtree(folder, ignore_errors=True)
    quantized = ctx.artifacts.quantized
    if quantized is not None:
        folder.mkdir(parents=True)
        for f in quantized.folder.iterdir():
            os.link(f, folder / f.name)  # same file system: no copy of the weights
    else:
        ctx.artifacts.model.save_pretrained(folder)
    ctx.artifacts.tokenizer.save_pretrained(folder)
    from dwc.perf.calibration import MANY_PROMPTS

    seqs = plan["max_num_seqs"] + MANY_PROMPTS  # + the prompts timed joining
    per_seq = -(-_longest(plan, prompt, output) // plan["block_size"])
    blocks = min(seqs * per_seq + 4, plan["num_blocks"])  # never more than the plan's memory
    config = EngineConfig.from_plan(plan, num_blocks=blocks, speculative=False)
    return Engine(folder, config, fusion=(ctx.artifacts.fusion or {}).get("plan"))


def _longest(plan: dict, prompt: int, output: int) -> int:
    """The longest sequence calibration or confirmation runs."""
    from dwc.perf.calibration import calibration_tokens

    return prompt + max(output, calibration_tokens(len(_powers(plan["max_num_seqs"]))))


def _calibrate(engine, plan: dict, prompt: int, output: int) -> tuple:
    """(Calibration, None), or (None, why) when the measurement failed: the build goes on
    with the roofline and says so in reports/tuning.json."""
    from dwc.perf.calibration import calibrate

    try:
        return calibrate(engine, prompt, output, _powers(plan["max_num_seqs"])), None
    except (ValueError, RuntimeError) as e:
        return None, f"{type(e).__name__}: {e}"


def _confirm(engine, tuning: dict, best: dict, slo, prompt: int, output: int, options) -> None:
    """`dwc bench`'s online measurement of the choice at the chosen rate: the measured
    p99 figures decide whether the SLO is met."""
    from dwc.perf.bench import BenchConfig, online

    rate = best["max_rps"]
    if rate <= 0:
        return
    if best["draft"]:  # the calibration engine runs without the draft
        tuning["confirmed"] = None
        tuning["confirmation"] = "not run: the choice speculates with the draft"
        return
    engine.set_limits(max_num_seqs=best["max_num_seqs"])
    # Steady state first: the requests of two predicted lifetimes load the engine unmeasured.
    at = best["at_max_rps"]
    lifetime = (at["ttft_ms"] + output * at["tpot_ms"]) / 1000
    warmup = max(options.warmup_requests, math.ceil(2 * rate * lifetime))
    result = online(engine, BenchConfig(input_len=prompt, output_len=output, rps=rate,
                                        online_requests=options.confirm_requests,
                                        online_warmup=warmup))
    tuning["measured"] = result
    misses = [f"measured p99 {name} {result[key]['p99']} ms > {limit} ms"
              for name, key, limit in (("TPOT", "tpot_ms", slo.target_latency_ms if slo else None),
                                       ("TTFT", "ttft_ms", slo.target_ttft_ms if slo else None))
              if limit is not None and result[key]["p99"] is not None
              and result[key]["p99"] > limit]
    completed, arrived = result["completed_rps_while_arriving"], result["arrival_rps"]
    if completed is not None and completed < SUSTAINED * arrived:  # fell behind the arrivals
        misses.append(f"requests completed at {completed} rps while arriving")
    tuning["confirmed"] = not misses
    if misses:
        tuning["reason"] = f"at the predicted {rate:.1f} rps: " + "; ".join(misses)
        if (slo and (slo.target_latency_ms or slo.target_ttft_ms or slo.target_rps)):
            tuning["meets_slo"] = False


def _powers(limit: int) -> list[int]:
    out, n = [], 1
    while n < limit:
        out.append(n)
        n *= 2
    return out + [limit]


def _figures(ctx, plan: dict, draft: bool) -> ModelFigures:
    d = ctx.artifacts.draft if draft and speculation(ctx.artifacts.draft) else None
    return ModelFigures(
        weight_bytes=weight_bytes(ctx),  # the figure the KV plan used
        params=sum(p.numel() for p in ctx.artifacts.model.parameters()),
        kv_bytes_per_token=plan["bytes_per_token"],
        tau=d["mean_accepted_tokens"] if d else 1.0,
        step_cost=1 + d["k"] * d["cost_ratio"] if d else 1.0)


def _candidate(machine, figures, seqs: int, draft: bool, slo, prompt: int, output: int) -> dict:
    """The highest request rate this configuration sustains within the SLO's p99 limits:
    searched with the closed forms, then checked by simulation (dwc/perf/loadsim.py), whose
    latencies are reported (they measured closer: benchmarks/costmodel_gpu.py)."""
    from dwc.perf.loadsim import check_rate

    limits = {"tpot_ms": slo.target_latency_ms if slo else None,
              "ttft_ms": slo.target_ttft_ms if slo else None}
    p = max_rps(machine, figures, prompt, output, seqs, **limits)
    sim, met = None, p.rps > 0
    if met:
        p, sim, met = check_rate(machine, figures, p.rps, prompt, output, seqs, **limits)
    row = {"max_num_seqs": seqs, "draft": draft, "max_rps": 0.0, "at_max_rps": p.as_dict()}
    if met and round(p.rps, 3) > 0:
        row["max_rps"] = round(p.rps, 3)
        row["at_max_rps"].update({k: v for k, v in sim.as_dict().items() if k != "rps"},
                                 latency_from="simulation")
    else:  # by how much the limits are missed: at the lowest rate simulated, or alone
        row["alone"] = (sim or predict(machine, figures, 1e-6, prompt, output, seqs)).as_dict()
    return row


def _decision(best: dict, rows: list, slo, target: str, prompt: int, output: int,
              usd_per_hour: float) -> dict:
    p = best["at_max_rps"]
    meets = best["max_rps"] > 0
    reason = None
    need = None
    if not meets:
        alone = best["alone"]
        misses = [f"p99 {name} {alone[key]} ms > {limit} ms" for name, key, limit in (
            ("TPOT", "tpot_p99_ms", slo.target_latency_ms if slo else None),
            ("TTFT", "ttft_p99_ms", slo.target_ttft_ms if slo else None))
            if limit is not None and alone[key] > limit]
        reason = f"no configuration of {target} meets the SLO at any request rate: " \
            + "; ".join(misses)
    elif slo and slo.target_rps:
        need = replicas(slo.target_rps, best["max_rps"])
        if need > 1:
            meets = False
            reason = (f"target_rps {slo.target_rps} needs {need} x {target} at p99 TPOT "
                      f"{slo.target_latency_ms} ms; one gives {best['max_rps']:.1f} rps")
    tok_s = p["output_tok_s"]
    return {"predicted": {**p, "max_rps": best["max_rps"], "prompt_tokens": prompt,
                          "output_tokens": output,
                          "usd_per_million_output_tokens": _round(usd_per_million_tokens(
                              usd_per_hour, tok_s)),
                          "usd_per_million_requests": _round(usd_per_million_tokens(
                              usd_per_hour, best["max_rps"])) if best["max_rps"] else None},
            "chosen": {"max_num_seqs": best["max_num_seqs"], "draft": best["draft"]},
            "replicas": need, "meets_slo": meets, "reason": reason,
            "candidates": rows,
            "label": "predicted by the cost model (a roofline from the target's figures), "
                     "not measured"}


def _round(x):
    return None if x is None else round(x, 4)


def _load_plot(machine, figures, best: dict, slo, prompt: int, output: int) -> bytes:
    """Predicted p99 TPOT and TTFT at 10..100% of the chosen maximum rate, with the SLO."""
    top = best["max_rps"] or 1.0
    loads = [top * i / 10 for i in range(1, 11)]
    preds = [predict(machine, figures, r, prompt, output, best["max_num_seqs"]) for r in loads]
    series = {"p99 TPOT (ms)": [p.tpot_p99_ms for p in preds],
              "p99 TTFT (ms)": [p.ttft_p99_ms for p in preds]}
    if slo and slo.target_latency_ms:
        series["SLO TPOT (ms)"] = [slo.target_latency_ms] * len(loads)
    return line_chart(series, title=f"Predicted latency against load (max {top:.1f} rps)",
                      xlabel="load, tenths of the chosen maximum", ylabel="ms")
