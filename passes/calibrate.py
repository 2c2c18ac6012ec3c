"""`calibrate`: run the calibration set through the source model and record what later
passes need: for the input of every Linear layer, the mean squared activation per input
channel (llama.cpp's importance matrix; AWQ's and SmoothQuant's activation scale) and the
largest absolute activation per input channel (static FP8 / INT8 ranges).
"""

from __future__ import annotations

from pathlib import Path

from dwc.compiler.artifacts import ActivationStats
from dwc.quality.data import batches, token_windows
from dwc.bundle.hashing import sha256_file
from dwc.passes.base import BatchOptions, Pass, PassResult
from dwc.compiler.reports import bar_chart, json_bytes

STATS_FILE = "calibration.safetensors"


class Calibrate(Pass):
    name = "calibrate"
    description = ("Run the calibration data through the source model; record per-channel "
                   "activation statistics (mean square, max |x|) at every Linear input.")
    reads = ("reference", "tokenizer")
    writes = ("calibration",)
    Options = BatchOptions
    cacheable = True

    def key_material(self, ctx, options):
        c = ctx.build.calibration
        return {"data": sha256_file(c.data), "samples": c.samples, "seq_len": c.seq_len,
                "version": 2}  # 2: records k_proj / v_proj output ranges

    def run(self, ctx, options) -> PassResult:
        c = ctx.build.calibration
        windows = token_windows(c.data, ctx.artifacts.tokenizer, c.samples, c.seq_len)
        stats = collect(ctx.artifacts.reference, windows, options.batch_size, ctx)
        report = summarize(stats)
        names = list(report["layers"])
        png = bar_chart(names, [report["layers"][n]["absmax"] for n in names],
                        title="Calibration: max |activation| at each Linear input",
                        ylabel="max |x|", log=True)
        return PassResult(
            outputs={"calibration": stats},
            metrics={"tokens": stats.tokens, "windows": len(windows), "layers": len(names),
                     "max_absmax": max(v["absmax"] for v in report["layers"].values())},
            reports={"calibration.json": json_bytes(report), "calibration.png": png})

    def save(self, outputs, folder: Path) -> None:
        from safetensors.torch import save_file

        stats = outputs["calibration"]
        tensors = {f"{n}.mean_sq": t for n, t in stats.mean_sq.items()}
        tensors.update({f"{n}.absmax": t for n, t in stats.absmax.items()})
        tensors.update({f"{n}.out_absmax": t for n, t in stats.out_absmax.items()})
        save_file(tensors, folder / STATS_FILE, metadata={"tokens": str(stats.tokens)})

    def load(self, folder: Path, ctx) -> dict:
        from safetensors import safe_open

        parts: dict[str, dict] = {"mean_sq": {}, "absmax": {}, "out_absmax": {}}
        with safe_open(folder / STATS_FILE, framework="pt") as f:
            tokens = int(f.metadata()["tokens"])
            for key in f.keys():
                name, _, kind = key.rpartition(".")
                parts[kind][name] = f.get_tensor(key)
        return {"calibration": ActivationStats(parts["mean_sq"], parts["absmax"], tokens,
                                               parts["out_absmax"])}


def collect(model, windows, batch_size: int, ctx) -> ActivationStats:
    """Hook every nn.Linear, run the windows, return per-channel input statistics."""
    import torch

    sums, peaks, outs, hooks = {}, {}, {}, []

    def out_hook(name):
        def fn(module, args, out):
            peak = out.detach().float().abs().amax()
            outs[name] = torch.maximum(outs[name], peak) if name in outs else peak
        return fn

    def hook(name):
        def fn(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # [tokens, in]
            sq = (x * x).sum(0)
            peak = x.abs().amax(0)
            sums[name] = sums[name] + sq if name in sums else sq
            peaks[name] = torch.maximum(peaks[name], peak) if name in peaks else peak
        return fn

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            hooks.append(module.register_forward_pre_hook(hook(name)))
            if name.endswith(("k_proj", "v_proj")):
                hooks.append(module.register_forward_hook(out_hook(name)))
    tokens = 0
    try:
        with torch.inference_mode(), ctx.reporter.progress("calibrating", len(windows)) as advance:
            for batch in batches(windows, batch_size):
                model(torch.stack(batch).to(model.device))
                tokens += sum(len(w) for w in batch)
                advance(len(batch))
    finally:
        for h in hooks:
            h.remove()
    return ActivationStats(mean_sq={n: (s / tokens).cpu() for n, s in sums.items()},
                           absmax={n: p.cpu() for n, p in peaks.items()}, tokens=tokens,
                           out_absmax={n: o.cpu() for n, o in outs.items()})


def summarize(stats: ActivationStats) -> dict:
    layers = {}
    for name in stats.mean_sq:
        absmax = stats.absmax[name]
        layers[name] = {
            "in_features": int(absmax.numel()),
            "absmax": round(float(absmax.max()), 6),
            "rms": round(float(stats.mean_sq[name].mean().sqrt()), 6),
            # How far the worst channel sits above a typical one: outliers hurt 8-bit ranges.
            "outlier_ratio": round(float(absmax.max() / absmax.median().clamp_min(1e-12)), 3),
        }
    return {"tokens": stats.tokens, "layers": layers}
