"""Kubernetes manifests of GPU bundles (serve/kubernetes*.yaml, `dwc deploy`): valid
against Kubernetes' schemas (kubernetes-validate, offline; the ServiceMonitor, a CRD, by
hand), recorded in the manifest, sized by `tune`; the Grafana dashboard queries only
metrics `dwc serve` exports (docs/DEPLOY.md)."""

from __future__ import annotations

import copy
import json
import math
import re
import shlex
import shutil

import httpx
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from dwc.compiler.deploy import containers, kubernetes, queue_target
from dwc.constants import HPA_MAX_FACTOR, MAX_WAITING, QUEUE_WAIT_S
from tests import test_http
from tests.conftest import assert_clean_error, dwc, manifest_of

K8S_VERSION = "1.37.0"  # the schemas tests validate against (README.md, "Deploy")
SLO = ("slo.target_rps=2000", "slo.target_latency_ms=20")
server = test_http.server  # the fixture: `dwc serve`'s app on the example bundle


@pytest.fixture(scope="module")
def gpu(build_for):
    """The example for h100-fp8 with an SLO that one H100 cannot carry: tune says how
    many replicas can."""
    return build_for("h100-fp8", *SLO)


def objects(text: str) -> dict:
    """The YAML file's objects by kind; each validated, the ServiceMonitor by hand."""
    docs = {d["kind"]: d for d in yaml.safe_load_all(text)}
    assert sorted(docs) == ["Deployment", "HorizontalPodAutoscaler", "Service", "ServiceMonitor"]
    for kind, doc in docs.items():
        if kind != "ServiceMonitor":
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    check_service_monitor(docs)
    return docs


def check_service_monitor(docs: dict) -> None:
    """The CRD's shape (monitoring.coreos.com/v1): it selects the Service, whose port it
    names, and the Service selects the Deployment's pods; the path is the container's."""
    mon, svc, dep = docs["ServiceMonitor"], docs["Service"], docs["Deployment"]
    assert mon["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(mon) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(mon["spec"]) == {"selector", "endpoints"}
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert dep["spec"]["selector"]["matchLabels"] == pod_labels
    (endpoint,) = mon["spec"]["endpoints"]
    assert set(endpoint) == {"port", "path", "interval"}
    assert endpoint["port"] in [p["name"] for p in svc["spec"]["ports"]]
    assert endpoint["path"].startswith("/") and re.fullmatch(r"\d+s", endpoint["interval"])


def container(docs: dict) -> dict:
    (c,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def script_command(path) -> list[str]:
    """The command a serve/*.sh script execs, as argv (without its "$@")."""
    line = next(l for l in path.read_text().replace("\\\n", " ").splitlines()
                if l.startswith("exec "))
    return shlex.split(line)[1:-1]


def without_host(argv: list[str]) -> list[str]:
    i = argv.index("--host")
    return argv[:i] + argv[i + 2:]


def test_a_gpu_bundle_has_valid_manifests_recorded_in_its_manifest(gpu):
    m = manifest_of(gpu)
    for name in ("kubernetes.yaml", "kubernetes-vllm.yaml", "grafana-dashboard.json"):
        assert f"serve/{name}" in m["files"], name
    assert dwc("inspect", "--verify", gpu).exit_code == 0
    own = objects((gpu / "serve" / "kubernetes.yaml").read_text())
    vllm = objects((gpu / "serve" / "kubernetes-vllm.yaml").read_text())
    c = container(own)
    assert c["command"][:3] == ["dwc", "serve", "/bundle"] and c["workingDir"] == "/bundle"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
    assert c["resources"]["limits"] == c["resources"]["requests"] == {"nvidia.com/gpu": 1}
    # vLLM's container runs what serve/vllm.sh runs, listening beyond the loopback.
    v = container(vllm)
    assert without_host(v["command"]) == without_host(script_command(gpu / "serve" / "vllm.sh"))
    assert v["command"][v["command"].index("--host") + 1] == "0.0.0.0"
    assert own["ServiceMonitor"]["spec"]["endpoints"][0]["path"] == "/metrics"
    assert vllm["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"] \
        == "vllm_num_requests_waiting"


def test_replicas_and_the_autoscaler_follow_tune(gpu):
    m = manifest_of(gpu)
    slo = m["slo"]
    rate = slo["predicted"]["max_rps"]
    assert slo["replicas"] == math.ceil(2000 / rate) > 1
    docs = objects((gpu / "serve" / "kubernetes.yaml").read_text())
    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert docs["Deployment"]["spec"]["replicas"] == hpa["minReplicas"] == slo["replicas"]
    assert hpa["maxReplicas"] == HPA_MAX_FACTOR * slo["replicas"]
    assert hpa["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    (metric,) = hpa["metrics"]
    assert metric["pods"]["metric"]["name"] == "dwc_queue_depth"
    # No TTFT target: the queue of QUEUE_WAIT_S at tune's rate, below dwc serve's 429 limit.
    want = min(math.floor(rate * QUEUE_WAIT_S), MAX_WAITING // 2)
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": str(want)}
    # With a TTFT target, the queue its slack over the predicted p99 TTFT absorbs.
    m2 = copy.deepcopy(m)
    m2["slo"]["target_ttft_ms"] = slo["predicted"]["ttft_p99_ms"] + 50
    assert queue_target(m2)[0] == math.floor(rate * 0.05)
    m2["slo"]["target_ttft_ms"] = slo["predicted"]["ttft_p99_ms"] / 2  # none to spare
    assert queue_target(m2)[0] == 1
    m2["slo"] = None  # no tune: one replica, one batch of the KV plan waiting
    assert queue_target(m2)[0] == m["kv_cache"]["max_num_seqs"]
    assert objects(kubernetes(m2, containers(m2)[0]))["Deployment"]["spec"]["replicas"] == 1


def test_tensor_parallel_bundles_ask_for_their_gpus(gpu):
    m = copy.deepcopy(manifest_of(gpu))
    m["kv_cache"]["tensor_parallel"] = 2
    for c in containers(m):
        docs = objects(kubernetes(m, c))
        spec = docs["Deployment"]["spec"]["template"]["spec"]
        assert spec["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 2}
        assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in spec["volumes"]
    assert "--tensor-parallel-size" in containers(m)[1].command


def test_a_tensorrt_llm_bundle_runs_trtllm_serve(build_for):
    b = build_for("h100-trtllm-fp8")
    assert "serve/kubernetes.yaml" in manifest_of(b)["files"]
    assert not (b / "serve" / "grafana-dashboard.json").exists()  # no dwc metrics there
    docs = objects((b / "serve" / "kubernetes.yaml").read_text())
    c = container(docs)
    assert without_host(c["command"]) == \
        without_host(script_command(b / "serve" / "trtllm-serve.sh"))
    assert docs["ServiceMonitor"]["spec"]["endpoints"][0]["path"] == "/prometheus/metrics"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"


def test_deploy_writes_the_folder_with_replicas_and_image(gpu, tmp_path):
    out = tmp_path / "k8s"
    r = dwc("deploy", gpu, "--out", out, "--replicas", "3", "--image", "reg.example/dwc:7",
            "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout) == {"out": str(out), "files": ["grafana-dashboard.json",
                                                              "kubernetes.yaml"]}
    docs = objects((out / "kubernetes.yaml").read_text())
    assert docs["Deployment"]["spec"]["replicas"] == 3 == \
        docs["HorizontalPodAutoscaler"]["spec"]["minReplicas"]
    assert container(docs)["image"] == "reg.example/dwc:7"
    assert (out / "grafana-dashboard.json").read_text() == \
        (gpu / "serve" / "grafana-dashboard.json").read_text()
    # Again into the same folder, for vLLM: replaced whole, nothing staged left behind.
    r = dwc("deploy", gpu, "--out", out, "--engine", "vllm")
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["kubernetes.yaml"]
    assert (out / "kubernetes.yaml").read_text() == \
        (gpu / "serve" / "kubernetes-vllm.yaml").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k8s"]
    assert_clean_error(dwc("deploy", gpu, "--out", out, "--engine", "sglang"), 2,
                       "--engine sglang", "dwc, vllm")


def test_deploy_refuses_bad_input_in_one_line(gpu, bundle, tmp_path):
    out = tmp_path / "out"
    assert_clean_error(dwc("deploy", bundle, "--out", out), 2, "cpu-bf16", "GPU")
    assert_clean_error(dwc("deploy", tmp_path / "nothing", "--out", out), 2)
    tampered = tmp_path / "tampered"
    shutil.copytree(gpu, tampered)
    with open(tampered / "serve" / "kubernetes.yaml", "a") as f:
        f.write("# replicas: 100\n")
    assert_clean_error(dwc("deploy", tampered, "--out", out), 2, "does not match its manifest",
                       "serve/kubernetes.yaml")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    assert_clean_error(dwc("deploy", gpu, "--out", foreign), 2, "notes.txt")
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    r = dwc("deploy", bundle, "--out", out, "--json")
    assert r.exit_code == 2 and json.loads(r.stdout)["error"]["code"] == 2
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == \
        ["mine", "tampered"]


def test_the_dashboard_queries_only_metrics_the_server_exports(server, gpu):
    url, engine = server
    board = json.loads((gpu / "serve" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    queried = {n for e in exprs for n in re.findall(r"\bdwc_[a-z_]+", e)}
    assert len(queried) >= 10 and len(board["panels"]) >= 9
    with httpx.Client(base_url=url, timeout=60) as c:
        def samples() -> dict:
            return {s.name: s.value for f in text_string_to_metric_families(c.get("/metrics").text)
                    for s in f.samples}
        before = samples()
        missing = queried - set(before)
        assert not missing, missing
        assert "dwc_queue_depth" in before  # the autoscaler's metric
        r = c.post("/v1/completions", json={"prompt": "def f(x):", "max_tokens": 5,
                                            "temperature": 0}).json()
        after = samples()
    tokens = after["dwc_output_tokens_total"] - before["dwc_output_tokens_total"]
    assert tokens == r["usage"]["completion_tokens"] > 0
    assert after["dwc_kv_blocks_total"] == len(engine.blocks.blocks)
    price = next(v for v in board["templating"]["list"] if v["name"] == "usd_per_hour")
    assert float(price["query"]) == manifest_of(gpu)["target"]["hardware"]["usd_per_hour"]
