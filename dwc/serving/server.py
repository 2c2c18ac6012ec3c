"""`InferenceServer`: the Python API over the runtime, and the one place that may also build.

    from dwc import InferenceServer
    server = InferenceServer("bundles/demo")
    server.generate("def main():", max_tokens=32)
    server.batch_inference([{"prompt": "import os", "max_tokens": 16}, "class Foo:"])

    # Build (or reuse) a bundle for this machine first, then serve it; optimization="auto"
    # (the default) searches this machine's targets for the cheapest that meets the SLO:
    server = InferenceServer(model="ckpt/", calibration_data="calib.txt",
                             evaluation_data="eval.txt", target_latency_ms=50)
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import yaml

from dwc.constants import cache_dir
from dwc.errors import BadInput
from dwc.runtime.engine import Engine, EngineConfig
from dwc.runtime.sequence import SamplingParams

# Logprobs are served over HTTP (dwc serve); batch_inference returns text and ids only,
# so it refuses them rather than ignore them.
SAMPLING_KEYS = {f.name for f in fields(SamplingParams)} - {"logprobs", "prompt_logprobs"}


class InferenceServer:
    def __init__(self, bundle: str | Path | None = None, *, model: str | Path | None = None,
                 calibration_data: str | Path | None = None,
                 evaluation_data: str | Path | None = None, target: str | None = None,
                 optimization: str | list = "auto", target_latency_ms: float | None = None,
                 target_rps: float | None = None, max_ppl_increase_pct: float = 2.0,
                 engine: EngineConfig | None = None):
        if bundle is None:
            if model is None or calibration_data is None or evaluation_data is None:
                raise BadInput("InferenceServer needs a bundle, or model= with "
                               "calibration_data= and evaluation_data= to build one")
            slo = {k: v for k, v in (("target_latency_ms", target_latency_ms),
                                     ("target_rps", target_rps)) if v is not None}
            bundle = build_for_this_machine(Path(model), Path(calibration_data),
                                            Path(evaluation_data), target, optimization, slo,
                                            max_ppl_increase_pct)
        self.bundle = Path(bundle)
        self.engine = Engine.from_bundle(self.bundle, engine)

    def generate(self, prompt: str, **sampling) -> str:
        return self.batch_inference([dict(sampling, prompt=prompt)])[0]["text"]

    def batch_inference(self, requests: list) -> list[dict]:
        """Requests are prompt strings or dicts with "prompt" and sampling fields
        (max_tokens, temperature, top_k, top_p, seed, stop, ignore_eos). All run batched."""
        prompts, params = [], []
        for i, r in enumerate(requests):
            r = {"prompt": r} if isinstance(r, str) else dict(r)
            if not isinstance(r.get("prompt"), str):
                raise BadInput(f"request {i}: needs a \"prompt\" string")
            unknown = set(r) - SAMPLING_KEYS - {"prompt"}
            if unknown:
                raise BadInput(f"request {i}: unknown field(s) {', '.join(sorted(unknown))}")
            prompts.append(r.pop("prompt"))
            params.append(SamplingParams(**r))
        return [{"text": c.text, "token_ids": c.output_ids, "finish_reason": c.finish_reason,
                 "prompt_tokens": len(c.prompt_ids), "completion_tokens": len(c.output_ids)}
                for c in self.engine.generate(prompts, params)]


def local_target() -> str:
    """The target that fits the hardware this process runs on."""
    import torch

    if not torch.cuda.is_available():
        return "cpu-bf16"
    name = torch.cuda.get_device_name(0)
    for key, target in (("H200", "h200-fp8"), ("H100", "h100-fp8"), ("A100", "a100-int4-awq")):
        if key in name:
            return target
    raise BadInput(f"no dwc target for the GPU {name!r}; pass target= explicitly")


def build_for_this_machine(model: Path, calibration: Path, evaluation: Path, target: str | None,
                           optimization, slo: dict, budget: float) -> Path:
    """Write a build file under the cache folder and build (pass results are cached, so a
    second call with the same inputs reuses them). With no target, `optimization="auto"`
    searches every target of this machine's hardware for the cheapest bundle within the
    quality budget and the SLO (docs/SEARCH.md); a pass list builds local_target()."""
    from dwc.compiler.build import build
    from dwc.compiler.hardware import resolve

    if target is None:
        target = resolve("auto") if optimization == "auto" else local_target()
    name = f"{model.resolve().name}-{target}"
    folder = cache_dir() / "bundles"
    folder.mkdir(parents=True, exist_ok=True)
    build_file = folder / f"{name}.yaml"
    spec = {"name": name, "model": str(model.resolve()),
            "calibration": {"data": str(calibration.resolve())},
            "evaluation": {"data": str(evaluation.resolve()), "max_ppl_increase_pct": budget},
            "optimization": optimization, "draft": "none"}
    if slo:
        spec["slo"] = slo
    build_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = folder / name
    build(build_file, target, out)
    return out
