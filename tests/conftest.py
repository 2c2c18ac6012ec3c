"""Shared fixtures: the trained example model, an isolated cache, one shared bundle build.

The example model is made by `make test` before pytest starts (examples/
make_example_model.py); if it is missing, the `example` fixture makes it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "stdlib-coder"
# Figures a test measured and wants in the run's output (pytest -q hides print()).
REPORT: list[str] = []


def pytest_terminal_summary(terminalreporter):
    if REPORT:
        terminalreporter.section("measured")
        for line in REPORT:
            terminalreporter.write_line(line)


def pytest_collection_modifyitems(config, items):
    """GPU tests run on the lent device only; here they are skipped, saying why."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the lent device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Each test session gets its own pass cache, so tests never see a user's entries."""
    path = tmp_path_factory.mktemp("dwc-cache")
    old = os.environ.get("DWC_CACHE_DIR")
    os.environ["DWC_CACHE_DIR"] = str(path)
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield path
    if old is None:
        os.environ.pop("DWC_CACHE_DIR", None)
    else:
        os.environ["DWC_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def example() -> Path:
    """examples/stdlib-coder with checkpoint/, calib.txt and eval.txt in place."""
    if not (EXAMPLE / "dwc-example.json").exists():
        subprocess.run([sys.executable, str(ROOT / "examples" / "make_example_model.py"),
                        "--out", str(EXAMPLE)], check=True)
    return EXAMPLE


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The python of .venv-vllm, where vLLM for CPU lives (its own torch and transformers).
    `make test` makes it before pytest starts; `make vllm` is a no-op once it exists."""
    subprocess.run(["make", "-s", "-C", str(ROOT), "vllm"], check=True)
    return ROOT / ".venv-vllm" / "bin" / "python"


def write_buildfile(folder: Path, example: Path, **changes) -> Path:
    """A copy of the example build file in `folder`, pointing at the example's files."""
    data = yaml.safe_load((example / "model.yaml").read_text())
    data["model"] = str(example / "checkpoint")
    data["calibration"]["data"] = str(example / "calib.txt")
    data["evaluation"]["data"] = str(example / "eval.txt")
    data["calibration"]["samples"] = 8
    data["evaluation"]["samples"] = 8
    for key, value in changes.items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def copy_checkpoint(example: Path, dest: Path) -> Path:
    shutil.copytree(example / "checkpoint", dest)
    return dest


def dwc(*args: str):
    """Run the CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    from dwc.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_clean_error(result, code: int, *fragments: str) -> str:
    """One line on stderr, the exit code, no traceback; returns the line."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def bundle(example, tmp_path_factory) -> Path:
    """One build of the example for cpu-bf16, shared by every test that only reads it."""
    out = tmp_path_factory.mktemp("bundles") / "demo"
    build_file = write_buildfile(tmp_path_factory.mktemp("bf"), example)
    result = dwc("build", build_file, "--target", "cpu-bf16", "-o", out)
    assert result.exit_code == 0, result.stderr
    return out


def manifest_of(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


@pytest.fixture(scope="session")
def build_for(example, tmp_path_factory):
    """Build the example for a target (+ --set options) once per session; returns the bundle."""
    built = {}

    def build(target: str, *sets: str):
        key = (target, sets)
        if key not in built:
            folder = tmp_path_factory.mktemp("q")
            bf = write_buildfile(folder, example, **{"evaluation.samples": 16})
            args = [a for s in sets for a in ("--set", s)]
            result = dwc("build", bf, "-t", target, "-o", folder / "bundle", *args)
            assert result.exit_code == 0, result.stderr
            built[key] = folder / "bundle"
        return built[key]
    return build
