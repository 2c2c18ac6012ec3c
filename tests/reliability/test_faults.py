"""Faults (issue 10): builds killed with SIGKILL at several points leave at the output
path either nothing or a whole bundle that verifies (a kill after the final rename), the
next build cleans their scratch folders, reuses what the cache holds and produces a bundle
that verifies."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from tests.conftest import dwc, write_buildfile


def test_sigkill_at_several_points_then_a_clean_build(example, tmp_path):
    bf = write_buildfile(tmp_path / "bf", example)
    out = tmp_path / "out"
    env = dict(os.environ, DWC_CACHE_DIR=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "dwc", "build", str(bf), "-t", "cpu-gguf-q4_k_m", "-o", str(out)]
    calibrated = tmp_path / "cache" / "passes" / "calibrate"
    for delay in (0.5, 2.5, 4.5, None):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        if delay is None:  # the last kill comes once calibrate's entry is in place (a loaded
            deadline = time.monotonic() + 300  # machine takes longer than any fixed delay;
            # entries being written are dot-folders, renamed when whole)
            while proc.poll() is None and not any(calibrated.glob("[!.]*")) and \
                    time.monotonic() < deadline:
                time.sleep(0.1)
            delay = 0.5
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode in (0, -signal.SIGKILL)
        if out.exists():  # finished, or killed after the bundle's rename: it must be whole
            assert dwc("inspect", "--verify", out).exit_code == 0, f"killed after {delay} s"
            shutil.rmtree(out)
    result = subprocess.run(cmd + ["--json"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert leftovers == [], leftovers
    assert dwc("inspect", "--verify", out).exit_code == 0
    passes = json.loads((out / "manifest.json").read_text())["passes"]
    assert any(p["cached"] for p in passes if p["name"] == "calibrate")  # survived a kill


def test_a_full_disk_while_writing_the_bundle_fails_cleanly(example, tmp_path):
    """ENOSPC from the bundle writer (simulated): one line naming it, exit 1 (an
    environment failure), nothing at the output path, no staging or scratch left."""
    import errno
    from unittest import mock

    from dwc.bundle import writer
    from tests.conftest import assert_clean_error

    def full(self, rel, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.staging / rel))

    bf = write_buildfile(tmp_path / "bf", example)
    with mock.patch.object(writer.BundleWriter, "write_bytes", full):
        result = dwc("build", bf, "-t", "cpu-gguf-q8_0", "-o", tmp_path / "out")
    assert_clean_error(result, 1, "[emit]", "No space left on device")
    assert [p.name for p in tmp_path.iterdir()] == ["bf"]


def test_two_builds_at_once_share_one_cache(example, tmp_path):
    """Concurrent builds with one DWC_CACHE_DIR (CI runners sharing a cache volume): both
    succeed with byte-identical bundle files, and every cache entry they left is intact
    (entries are written aside and renamed into place)."""
    from dwc.compiler.cache import _intact

    bf = write_buildfile(tmp_path / "bf", example)
    cache = tmp_path / "cache"
    env = dict(os.environ, DWC_CACHE_DIR=str(cache))
    procs = [subprocess.Popen([sys.executable, "-m", "dwc", "build", str(bf), "-t", "cpu-bf16",
                               "-o", str(tmp_path / name), "--json"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("a", "b")]
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
    files = [json.loads((tmp_path / name / "manifest.json").read_text())["files"]
             for name in ("a", "b")]
    assert files[0] == files[1]  # every file's sha256 and size
    entries = [e for e in (cache / "passes").glob("*/*") if not e.name.startswith(".")]
    assert entries and all(_intact(e) for e in entries)
    assert not [e for e in (cache / "passes").glob("*/.*")]  # no half-written entry left
