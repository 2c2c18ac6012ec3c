"""The `dwc` command line. Thin: it parses, calls dwc's functions, prints, and maps errors
to one line and an exit code (README.md, "Commands"). Human output and progress go to
stderr, `--json` output to stdout."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import click

from dwc.cli.command import command
from dwc.constants import MAX_WAITING, VERSION as __version__
from dwc.errors import EXIT_BAD_INPUT


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dwc")
def main():
    """dwc, the Deadwood compiler: optimize an LLM checkpoint for a target and emit a
    verifiable serving bundle.

    \b
    dwc build model.yaml --target cpu-bf16 -o bundles/demo
    dwc build model.yaml --target auto -o bundles/best     (searches this machine's targets)
    dwc inspect bundles/demo [--verify]
    dwc serve bundles/demo [--port 8000]
    dwc bench bundles/demo [--rps 2 --rps 8]
    dwc deploy bundles/gpu --out k8s/ [--replicas 4] [--image IMG]
    dwc targets | dwc passes

    Exit codes: 0 ok, 1 a pass failed, 2 bad usage or input, 3 quality budget
    exceeded, 4 SLO not met.
    """


@main.command()
@click.argument("build_file", type=click.Path(path_type=Path))
@click.option("--target", "-t", "target", required=True,
              help="Target name (see `dwc targets`), or a hardware (h100, cpu, ...) or "
                   "`auto` (this machine's) to search its targets for the cheapest bundle "
                   "that meets the budget and SLO (docs/SEARCH.md).")
@click.option("--output", "-o", "output", required=True, type=click.Path(path_type=Path),
              help="Bundle folder to write (replaced atomically if it is a dwc bundle).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a build-file value (calibration.samples=64) or a pass option "
                   "(evaluate.batch_size=8). Repeatable.")
@click.option("--no-cache", is_flag=True, help="Recompute every pass; do not read or write the cache.")
@click.option("--force", is_flag=True, help="Replace an output path that is not a dwc bundle.")
@command
def build(build_file, target, output, overrides, no_cache, force, as_json):
    """Compile BUILD_FILE (model.yaml) for a target into a serving bundle."""
    from dwc.compiler.build import build as run_build
    from dwc.cli.inspect_view import build_summary
    from dwc.compiler.ui import Reporter

    manifest = run_build(build_file, target, output, overrides, use_cache=not no_cache,
                         force=force, reporter=Reporter())
    if as_json:
        click.echo(json.dumps({"bundle": str(Path(output).absolute()), "manifest": manifest}))
    else:
        build_summary(manifest, Path(output))


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--verify", is_flag=True, help="Re-hash every file against the manifest.")
@command
def inspect(bundle, verify, as_json):
    """Explain a bundle: target, passes, quality, sizes. Refuses a tampered bundle."""
    from dwc.bundle.reader import open_bundle, read_manifest, verify as check
    from dwc.errors import BundleError
    from dwc.cli.inspect_view import show_manifest

    if verify:
        manifest = read_manifest(bundle)
        problems = check(bundle, manifest, full=True)
        if as_json:
            result = {"bundle": str(bundle), "verified": not problems, "problems": problems}
            if problems:
                result["error"] = {"code": EXIT_BAD_INPUT, "pass": None,
                                   "message": f"{len(problems)} file(s) differ from the manifest"}
            click.echo(json.dumps(result))
            sys.exit(EXIT_BAD_INPUT if problems else 0)
        for line in problems:
            click.echo(f"differs: {line}", err=True)
        if problems:
            raise BundleError(f"{bundle}: {len(problems)} file(s) differ from the manifest")
        click.echo(f"verified: {len(manifest['files'])} files match the manifest")
        return
    manifest = open_bundle(bundle)
    if as_json:
        click.echo(json.dumps(manifest))
    else:
        show_manifest(manifest, Path(bundle))


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=int, help="Port to listen on.")
@click.option("--max-waiting", default=MAX_WAITING, show_default=True, type=int,
              help="Requests allowed to wait; beyond that the server answers 429.")
@click.option("--max-body-bytes", default=4 << 20, show_default=True, type=click.IntRange(1),
              help="Largest request body; a larger one is answered 413 before it is parsed.")
@click.option("--no-draft", is_flag=True,
              help="Do not speculate with the bundle's draft model (requests can also "
                   "turn it off one by one with \"speculative\": false).")
@click.option("--ngram", is_flag=True,
              help="Speculate by n-gram lookup in each request's prompt and output (no "
                   "draft model; lossless) instead of with the bundle's draft.")
@click.option("--tensor-parallel", type=click.IntRange(1), default=None,
              help="Split the model across this many GPUs (NCCL; CPU: processes over gloo). "
                   "[default: the bundle's target, else 1]")
@click.option("--kv-host-gib", type=click.FloatRange(min=0), default=None,
              help="Host memory (GiB) for prefix-cache blocks evicted from the device cache; "
                   "a later prefix hit copies them back (0: off). [default: the bundle's "
                   "KV plan, else 0]")
@command
def serve(bundle, host, port, max_waiting, max_body_bytes, no_draft, ngram, tensor_parallel,
          kv_host_gib, as_json):
    """Serve a torch-triton bundle over the OpenAI HTTP API (refuses a tampered bundle)."""
    from dwc.bundle.reader import read_manifest
    from dwc.runtime.engine import Engine

    engine = Engine.from_bundle(bundle, speculative=not no_draft, tensor_parallel=tensor_parallel,
                                ngram=ngram, kv_host_gib=kv_host_gib)
    import uvicorn  # the server stack after the engine: a refused bundle needs none of it

    from dwc.serving.http_server import make_app

    app = make_app(engine, read_manifest(bundle)["name"], max_waiting, max_body_bytes)
    if as_json:
        click.echo(json.dumps({"serving": str(bundle), "url": f"http://{host}:{port}",
                               "tensor_parallel": engine.config.tensor_parallel}))
    # SIGTERM: uvicorn stops accepting, finishes in-flight requests, then exits.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:  # tensor-parallel workers: stopped at once (the engine thread may be mid-step)
        engine.close(force=True)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--num-prompts", default=16, show_default=True, type=click.IntRange(1),
              help="Offline: prompts submitted at once.")
@click.option("--input-len", default=128, show_default=True, type=click.IntRange(1))
@click.option("--output-len", default=64, show_default=True, type=click.IntRange(1))
@click.option("--rps", "rps_levels", multiple=True, type=click.FloatRange(min=0, min_open=True),
              help="Online: Poisson arrival rate(s), requests/s. Repeatable. [default: 2]")
@click.option("--requests", default=16, show_default=True, type=click.IntRange(1),
              help="Online: requests per rate.")
@click.option("--no-baseline", is_flag=True, help="Skip the transformers baseline.")
@click.option("--no-draft", is_flag=True, help="Measure without the bundle's draft model.")
@click.option("--ngram", is_flag=True, help="Measure with n-gram speculation instead.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for bench.json and latency.png (the bundle itself is never changed).")
@command
def bench(bundle, num_prompts, input_len, output_len, rps_levels, requests, no_baseline,
          no_draft, ngram, out, as_json):
    """Measure a bundle. torch-triton: offline throughput and online latency, against its
    SLO. GGUF: llama.cpp's prompt and generation tok/s against transformers on this CPU."""
    from dwc import backends
    from dwc.perf.bench import BenchConfig
    from dwc.bundle.reader import open_bundle
    from dwc.compiler.reports import json_bytes

    manifest = open_bundle(bundle)
    cfg = BenchConfig(num_prompts, input_len, output_len, baseline=not no_baseline,
                      online_requests=requests, rps_levels=tuple(rps_levels) or (2.0,))
    speculation = "ngram" if ngram else "none" if no_draft else "bundle"
    run = backends.get(manifest["target"]["backend"]).bench(bundle, manifest, cfg, speculation)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_bytes(json_bytes(run.result))
        for name, data in run.files.items():
            (out / name).write_bytes(data)
    if as_json:
        click.echo(json.dumps(run.result))
        return
    for line in run.lines:
        click.echo(line)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder to write kubernetes.yaml (and grafana-dashboard.json) to, whole.")
@click.option("--replicas", type=click.IntRange(1), default=None,
              help="Pods to start with. [default: the replicas `tune` computed, else 1]")
@click.option("--image", default=None, help="Container image. [default: the engine's]")
@click.option("--engine", default=None,
              help="Another engine the bundle runs on (vllm). [default: the bundle's own]")
@command
def deploy(bundle, out, replicas, image, engine, as_json):
    """Write Kubernetes manifests for a GPU bundle: Deployment, Service, autoscaler on the
    request queue, ServiceMonitor (docs/DEPLOY.md). Refuses a tampered bundle."""
    from dwc.bundle.reader import open_bundle
    from dwc.compiler.deploy import deploy_files, write_folder

    files = deploy_files(open_bundle(bundle), bundle, engine, replicas, image)
    path = write_folder(out, files)
    if as_json:
        click.echo(json.dumps({"out": str(path), "files": sorted(files)}))
    else:
        for name in sorted(files):
            click.echo(f"wrote {path / name}")


@main.command()
@click.argument("bundle_a", type=click.Path(path_type=Path))
@click.argument("bundle_b", type=click.Path(path_type=Path))
@click.option("--bench-a", type=click.Path(path_type=Path), default=None,
              help="A's `dwc bench --out` result (bench.json): throughput, latency, cost.")
@click.option("--bench-b", type=click.Path(path_type=Path), default=None,
              help="B's bench.json.")
@click.option("--fail-on", default="", metavar="RULES",
              help='Exit 1 when B crosses a threshold against A, e.g. "ppl>+0.5%,kl>+10%,'
                   'tpot_p99>+5%,cost>+3%" (relative with %, absolute without).')
@command
def diff(bundle_a, bundle_b, bench_a, bench_b, fail_on, as_json):
    """Compare two bundles: quality, size, measured speed and cost, changed passes."""
    from dwc.bundle.reader import open_bundle
    from dwc.cli.diff import METRICS, compare, parse_rules, read_bench

    rules = parse_rules(fail_on)
    result = compare(open_bundle(bundle_a), open_bundle(bundle_b), read_bench(bench_a),
                     read_bench(bench_b), rules)
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"A {result['a']['name']} ({result['a']['target']})   "
                   f"B {result['b']['name']} ({result['b']['target']})")
        for name, row in result["metrics"].items():
            pct = f"{row['change_pct']:+.3f}%" if row["change_pct"] is not None else "-"
            click.echo(f"  {name:<14}{row['a']:>16.6g}{row['b']:>16.6g}  {pct:>10}   "
                       f"{METRICS[name][0]}")
        for p in result["passes_changed"]:
            click.echo(f"  pass {p['pass']}: " + (f"only in {p['only_in']}" if "only_in" in p
                                                  else json.dumps(p["options"])))
        if result["search"]:  # both bundles were built by a search
            from dwc.cli.search_view import echo_side_by_side

            echo_side_by_side(result["search"])
        for f in result["failed"]:
            click.echo(f"FAILED {f['rule']} (change {f['change']:+g})")
    if result["failed"]:
        sys.exit(1)


@main.command()
@command
def targets(as_json):
    """List the targets this dwc can build for."""
    from dwc.cli.inspect_view import table
    from dwc.compiler.hardware import hardware_of
    from dwc.compiler.target import all_targets

    rows = [t.summary() for t in all_targets()]
    if as_json:
        click.echo(json.dumps(rows))
    else:
        rows = [dict(r, tp=r["tensor_parallel"], hardware=hardware_of(r["name"])) for r in rows]
        table("targets (--target HARDWARE or auto searches a hardware's targets)", rows,
              ["name", "hardware", "backend", "device", "weights", "dtype", "kv_cache", "tp",
               "description"])


@main.command()
@command
def passes(as_json):
    """List the passes, what they read and write, and their options."""
    from dwc.config import describe
    from dwc.cli.inspect_view import show_passes
    from dwc.passes import REGISTRY

    rows = [{"name": p.name, "description": p.description, "reads": list(p.reads),
             "optional_reads": list(p.optional_reads), "writes": list(p.writes),
             "cacheable": p.cacheable, "options": describe(p.Options)}
            for p in REGISTRY.values()]
    if as_json:
        click.echo(json.dumps(rows, default=str))
    else:
        show_passes(rows)
