"""The pass manager: failures name the pass and those run before it; the cache resumes."""

from __future__ import annotations

import json

from dwc.passes.base import Pass
from tests.conftest import assert_clean_error, dwc, manifest_of, write_buildfile


class Explode(Pass):
    name = "explode"
    description = "test double that fails"
    reads = ("model",)

    def run(self, ctx, options):
        raise ZeroDivisionError("the test asked for it")


def test_a_failing_pass_is_named_with_the_passes_before_it(example, tmp_path, monkeypatch):
    from dwc.passes import REGISTRY

    monkeypatch.setitem(REGISTRY, "explode", Explode)
    bf = write_buildfile(tmp_path, example,
                         optimization=["load", "calibrate", "explode", "evaluate", "emit"])
    result = dwc("build", bf, "-t", "cpu-bf16", "-o", tmp_path / "out")
    assert_clean_error(result, 1, "[explode]", "pass 'explode' failed",
                       "passes run: load, calibrate", "ZeroDivisionError")
    assert not (tmp_path / "out").exists()
    as_json = dwc("build", bf, "-t", "cpu-bf16", "-o", tmp_path / "out", "--json")
    assert json.loads(as_json.stdout)["error"]["pass"] == "explode"


def test_changed_inputs_miss_the_cache_and_corrupt_entries_are_rebuilt(example, tmp_path,
                                                                      isolated_cache):
    bf = write_buildfile(tmp_path, example, **{"calibration.samples": 3})
    out = tmp_path / "b"
    assert dwc("build", bf, "-t", "cpu-bf16", "-o", out).exit_code == 0
    first = {p["name"]: p["cached"] for p in manifest_of(out)["passes"]}
    assert first["calibrate"] is False
    # Same inputs: cached. Corrupt the calibrate entry: detected by hash, recomputed.
    entries = sorted((isolated_cache / "passes" / "calibrate").glob("*/outputs/*.safetensors"),
                     key=lambda p: p.stat().st_mtime)
    stats = entries[-1]
    data = bytearray(stats.read_bytes())
    data[-1] ^= 1
    stats.write_bytes(bytes(data))
    assert dwc("build", bf, "-t", "cpu-bf16", "-o", out).exit_code == 0
    second = {p["name"]: p["cached"] for p in manifest_of(out)["passes"]}
    assert second["calibrate"] is False and second["evaluate"] is True
    assert dwc("build", bf, "-t", "cpu-bf16", "-o", out).exit_code == 0
    assert {p["name"]: p["cached"] for p in manifest_of(out)["passes"]}["calibrate"] is True
    # A changed calibration setting is a different key.
    result = dwc("build", bf, "-t", "cpu-bf16", "-o", out, "--set", "calibration.samples=2")
    assert result.exit_code == 0
    m = manifest_of(out)
    assert {p["name"]: p["cached"] for p in m["passes"]}["calibrate"] is False
    calib = next(p for p in m["passes"] if p["name"] == "calibrate")
    assert calib["metrics"]["windows"] == 2


def test_sigterm_mid_build_leaves_nothing_behind(example, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    bf = write_buildfile(tmp_path / "bf", example)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "dwc", "build", str(bf), "-t", "cpu-bf16",
                             "-o", str(out), "--no-cache"], stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ))
    deadline = time.time() + 60
    while not any(".work-" in p.name for p in tmp_path.iterdir()) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # well inside the passes
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, err)
    assert "error: interrupted" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf"]


def test_every_artifact_a_pass_names_is_a_typed_field():
    """Reads, optional reads and writes name fields of dwc/compiler/artifacts.py: a typo
    is caught here, not as an artifact nobody reads."""
    from dwc.compiler.artifacts import ARTIFACTS, Artifacts
    from dwc.passes import REGISTRY

    named = set()
    for p in REGISTRY.values():
        named.update(p.reads + p.optional_reads + p.writes)
    assert named <= set(ARTIFACTS), named - set(ARTIFACTS)
    assert set(ARTIFACTS) - named == set()  # and every field is some pass's artifact
    assert Artifacts().model is None
