"""Kubernetes manifests (a Deployment, a Service, a HorizontalPodAutoscaler and a
ServiceMonitor) and the Grafana dashboard for a GPU bundle, made from its manifest.json:
`emit` writes them into serve/, `dwc deploy` into a folder of the user's (docs/DEPLOY.md).

The numbers come from the build: GPUs per pod from the KV plan's tensor parallelism,
replicas from `tune` (slo.replicas, for slo.target_rps), the autoscaler's target queue
from tune's predicted rate and the TTFT the SLO leaves over (queue_target).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

from dwc import backends
from dwc.compiler.dashboard import dashboard
from dwc.compiler.templating import render
from dwc.constants import BUNDLE_MOUNT, HPA_MAX_FACTOR, QUEUE_WAIT_S, SERVE_PORT, VERSION
from dwc.errors import BadInput

KUBERNETES = "kubernetes.yaml"      # the bundle's own engine; others: kubernetes-<engine>.yaml
DASHBOARD = "grafana-dashboard.json"
MAX_NAME = 63                       # a Kubernetes object name (DNS-1123 label)


def containers(manifest: dict) -> list:
    """The engines that serve the bundle in a container (its own first); none for a CPU
    bundle (docs/DEPLOY.md says why)."""
    if manifest["target"].get("device") != "cuda":
        return []
    return backends.get(manifest["target"]["backend"]).containers(manifest, SERVE_PORT)


def serve_files(manifest: dict) -> dict[str, str]:
    """What `emit` writes into serve/: the own engine's manifests as kubernetes.yaml, each
    alternative's as kubernetes-<engine>.yaml, and the dashboard where dwc serves."""
    files = {}
    for i, c in enumerate(containers(manifest)):
        files[KUBERNETES if i == 0 else f"kubernetes-{c.engine}.yaml"] = kubernetes(manifest, c)
        if c.dwc_metrics:
            files[DASHBOARD] = dashboard_json(manifest, c)
    return files


def deploy_files(manifest: dict, bundle: Path, engine: str | None = None,
                 replicas: int | None = None, image: str | None = None) -> dict[str, str]:
    """What `dwc deploy` writes: one engine's kubernetes.yaml (the bundle's own unless
    `engine` names another), with --replicas and --image, and the dashboard for dwc."""
    found = containers(manifest)
    if not found:
        raise BadInput(f"{bundle}: target {manifest['target']['name']} is not a GPU target; "
                       "dwc deploy writes Kubernetes manifests for GPU bundles (docs/DEPLOY.md)")
    names = [c.engine for c in found]
    if engine is not None and engine not in names:
        raise BadInput(f"--engine {engine}: {bundle} is served by {', '.join(names)}")
    if image is not None and not image.strip():
        raise BadInput("--image: empty")
    c = found[names.index(engine)] if engine else found[0]
    files = {KUBERNETES: kubernetes(manifest, c, replicas, image)}
    if c.dwc_metrics:
        files[DASHBOARD] = dashboard_json(manifest, c)
    return files


def tune_replicas(manifest: dict) -> int:
    """The replicas `tune` computed for slo.target_rps; 1 without them."""
    return (manifest.get("slo") or {}).get("replicas") or 1


def queue_target(manifest: dict, max_waiting: int | None = None) -> tuple[int, str]:
    """Requests waiting per pod at which the autoscaler adds pods, and why. By Little's
    law a request that finds Q waiting waits about Q / rate: with tune's predicted rate
    and the queueing delay the SLO allows (target_ttft_ms minus the predicted p99 TTFT;
    QUEUE_WAIT_S without a TTFT target), Q = floor(rate x delay), at least 1. Without a
    prediction: one batch of the KV plan's max_num_seqs. Never more than half the
    engine's `max_waiting`, past which it refuses requests: the pods come before that."""
    q, why = _queue(manifest)
    if max_waiting is not None and q > max_waiting // 2:
        return max_waiting // 2, f"{why}, capped at half the server's --max-waiting {max_waiting}"
    return q, why


def _queue(manifest: dict) -> tuple[int, str]:
    slo = manifest.get("slo") or {}
    predicted = slo.get("predicted") or {}
    rate = predicted.get("max_rps")
    if not rate:
        seqs = manifest["kv_cache"].get("max_num_seqs") or 1
        return seqs, f"no prediction by `tune`: one batch of the KV plan's max_num_seqs ({seqs})"
    if slo.get("target_ttft_ms"):
        delay = (slo["target_ttft_ms"] - predicted["ttft_p99_ms"]) / 1000
        why = f"target_ttft_ms {slo['target_ttft_ms']} - predicted p99 TTFT {predicted['ttft_p99_ms']} ms"
    else:
        delay, why = QUEUE_WAIT_S, "no TTFT target"
    q = max(1, math.floor(rate * delay))
    return q, f"max(1, floor(tune's {rate} rps x {delay:.3f} s of queueing ({why}))) = {q}"


def resource_name(bundle_name: str, engine: str) -> str:
    """The bundle's name as a Kubernetes object name (lower case, '-'), with the engine."""
    base = re.sub(r"[^a-z0-9-]+", "-", bundle_name.lower()).strip("-") or "bundle"
    return f"{base[:MAX_NAME - len(engine) - 1].rstrip('-')}-{engine}"


def kubernetes(manifest: dict, c, replicas: int | None = None, image: str | None = None) -> str:
    """The four objects of one engine, as one YAML file (templates/kubernetes.yaml.j2)."""
    name = resource_name(manifest["name"], c.engine)
    want = replicas or tune_replicas(manifest)
    if replicas:
        replicas_note = f"{want}, from dwc deploy --replicas (tune computed {tune_replicas(manifest)})"
    elif (manifest.get("slo") or {}).get("replicas"):
        slo = manifest["slo"]
        replicas_note = (f"{want} = ceil(target_rps {slo['target_rps']} / tune's "
                         f"{slo['predicted']['max_rps']} rps per replica)")
    else:
        replicas_note = "1 (no slo.target_rps for `tune` to size)"
    q, queue_note = queue_target(manifest, c.max_waiting)
    gpus = manifest["kv_cache"].get("tensor_parallel") or 1
    values = {
        "name": name, "bundle": manifest["name"], "target": manifest["target"]["name"],
        "version": VERSION, "engine": c.engine, "image": image or c.image,
        "command": c.command, "port": c.port, "health_path": c.health_path,
        "metrics_path": c.metrics_path, "gpus": gpus, "shm": gpus > 1,
        "replicas": want, "max_replicas": HPA_MAX_FACTOR * want, "replicas_note": replicas_note,
        "queue_metric": c.queue_metric, "queue_target": q, "queue_note": queue_note,
        "claim": resource_name(manifest["name"], "bundle"), "mount": BUNDLE_MOUNT,
        "labels": {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "dwc"},
    }
    return render("kubernetes.yaml.j2", k=values)


def dashboard_json(manifest: dict, c) -> str:
    job = resource_name(manifest["name"], c.engine)  # the ServiceMonitor's job: the Service
    usd = manifest["target"]["hardware"].get("usd_per_hour") or 0
    return json.dumps(dashboard(manifest["name"], job, usd), indent=2) + "\n"


def write_folder(out: Path, files: dict[str, str]) -> Path:
    """Write `files` as the folder `out`, whole or not at all: staged next to it and
    renamed into place. An existing `out` is replaced only if it holds nothing but what
    dwc deploy writes."""
    out = Path(out).absolute()
    if out.exists():
        if not out.is_dir():
            raise BadInput(f"--out {out}: is a file")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in (KUBERNETES, DASHBOARD))
        if foreign:
            raise BadInput(f"--out {out}: holds {foreign[0]}, which dwc deploy does not write; "
                           "choose an empty or new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    try:
        for name, text in files.items():
            (staging / name).write_text(text, encoding="utf-8")
        staging.chmod(0o755)
        if out.exists():
            os.rename(out, old)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old.exists() and not out.exists():
            os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out
