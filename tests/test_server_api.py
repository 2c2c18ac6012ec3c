"""The Python API: InferenceServer over a bundle, and building one for this machine."""

from __future__ import annotations

import pytest

from dwc.errors import BadInput
from tests.test_runtime import PROMPTS


def test_inference_server_on_a_bundle(bundle):
    from dwc import InferenceServer

    server = InferenceServer(bundle)
    results = server.batch_inference([PROMPTS[0], {"prompt": PROMPTS[1], "max_tokens": 5,
                                                   "ignore_eos": True}])
    assert results[1]["completion_tokens"] == 5 and results[1]["finish_reason"] == "length"
    assert results[0]["prompt_tokens"] > 0 and isinstance(results[0]["text"], str)
    assert server.generate(PROMPTS[1], max_tokens=5, ignore_eos=True) == results[1]["text"]
    with pytest.raises(BadInput, match="unknown field"):
        server.batch_inference([{"prompt": "x", "beam_width": 4}])
    with pytest.raises(BadInput, match="unknown field"):  # not returned here: refused
        server.batch_inference([{"prompt": "x", "logprobs": 2}])
    with pytest.raises(BadInput, match="prompt"):
        server.batch_inference([{"max_tokens": 4}])


def test_inference_server_refuses_a_tampered_bundle(bundle, tmp_path):
    import shutil

    from dwc import InferenceServer
    from dwc.errors import BundleError

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    (copy / "model" / "config.json").write_text("{}")
    with pytest.raises(BundleError, match="does not match its manifest"):
        InferenceServer(copy)


def test_inference_server_builds_for_this_machine(example, isolated_cache):
    from dwc import InferenceServer

    server = InferenceServer(model=example / "checkpoint", calibration_data=example / "calib.txt",
                             evaluation_data=example / "eval.txt", target_latency_ms=50)
    # optimization="auto": this machine's hardware searched (docs/SEARCH.md)
    assert server.bundle == isolated_cache / "bundles" / "checkpoint-cpu"
    import json

    manifest = json.loads((server.bundle / "manifest.json").read_text())
    assert manifest["target"]["name"] == "cpu-bf16" and manifest["slo"]["target_latency_ms"] == 50
    rows = {r["target"]: r for r in manifest["search"]["candidates"]}
    assert rows["cpu-bf16"]["status"] == "winner"
    assert server.generate(PROMPTS[0], max_tokens=3, ignore_eos=True)
