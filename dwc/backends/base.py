"""The interface a serving backend implements (docs/ARCHITECTURE.md, "Backends").

A backend is everything a bundle's serving engine means to dwc: which models it can
take, how `model/` (and `serve/`) are written, what the quality gate runs to get the
optimized model's logits, and how `dwc bench` measures a bundle. The compiler, the
quality gate and the CLI ask the target's backend (`dwc.backends.get`) and never branch
on its name; a new backend is one folder under dwc/backends/ and one line in the
registry (dwc/backends/__init__.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dwc.errors import BadInput, TargetError


@dataclass
class BenchRun:
    """What `dwc bench` reports: the result (bench.json and --json), the lines it prints,
    and any other files it writes to --out."""

    result: dict
    lines: list[str]
    files: dict[str, bytes] = field(default_factory=dict)


@dataclass
class ServingContainer:
    """How one engine serves a bundle in a container, for the Kubernetes manifests
    (dwc/compiler/deploy.py, docs/DEPLOY.md). `command` runs in the bundle's folder."""

    engine: str               # a short name: the manifests' file and resource suffix
    image: str                # the default container image (`dwc deploy --image` sets another)
    command: list[str]
    port: int
    health_path: str          # readiness, liveness and startup probes
    metrics_path: str         # Prometheus scrape path (the ServiceMonitor)
    queue_metric: str         # requests waiting, per pod, as the metrics adapter names it
    dwc_metrics: bool = False  # exports dwc's /metrics (the Grafana dashboard's queries)
    max_waiting: int | None = None  # requests it queues before refusing them, if bounded


class Backend:
    name: str = ""
    description: str = ""
    # Passes only this backend's targets may run (its exporter, its quantizer).
    own_passes: tuple[str, ...] = ()
    # dwc splits its bundles across GPUs (targets' tensor_parallel > 1).
    tensor_parallel: bool = False

    def check_model(self, target, info) -> None:
        """Refuse, in one line (TargetError), a model this backend cannot serve under
        `target`. The default: every quantized Linear's input size splits into whole
        groups (INT4) or fits the 16-element alignment of FP8 / INT8 matrix kernels, and
        quantized schemes need a GPU."""
        scheme = target.weights.scheme
        multiple = target.weights.group_size or (16 if scheme != "none" else 1)
        for name in ("hidden_size", "intermediate_size"):
            size = getattr(info, name)
            if size % multiple:
                raise TargetError(f"target {target.name}: {name} {size} is not a multiple of "
                                  f"{multiple}, which {scheme} needs")
        if target.device == "cpu" and scheme != "none":
            raise TargetError(f"target {target.name}: {scheme} needs a GPU runtime")

    def emit(self, writer, ctx) -> None:
        """Write the bundle's model/ (and serve/) in this backend's layout."""
        raise NotImplementedError

    def eval_logits(self, ctx, model, kv_plan: dict | None):
        """The optimized model's logits for the quality gate: a callable taking a batch of
        token windows ([B, T] ids) and returning [B, T, vocab] logits, as
        dwc.quality.metrics.compare reads them; `close()` is called on it afterwards when it has
        one. `model` is the build's optimized model in memory."""
        raise NotImplementedError

    def bench(self, bundle: Path, manifest: dict, cfg, speculation: str) -> BenchRun:
        """Measure a bundle on this machine (`dwc bench`); cfg: dwc.perf.bench.BenchConfig."""
        raise BadInput(f"{bundle}: `dwc bench` does not measure {self.name} bundles")

    def alternative_serving(self, manifest: dict) -> str | None:
        """A command line another engine serves the bundle with, for its README."""
        return None

    def containers(self, manifest: dict, port: int) -> list[ServingContainer]:
        """The engines that serve a GPU bundle in a container, its own first; none: the
        bundle gets no Kubernetes manifests."""
        return []
