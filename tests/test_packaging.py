"""Packaging: passes/, targets/, templates/ install under dwc.*; the CLI answers --help."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import ROOT, dwc


def test_wheel_holds_only_the_dwc_package(tmp_path):
    # Build from a copy: setuptools writes build/ next to the sources it builds.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", ".venv-vllm", ".peers", ".git", "build", "*.egg-info", "checkpoint", "*.txt",
        ".whl", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(src)], check=True)
    wheel = next(Path(tmp_path).glob("dwc-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"dwc", "dwc-0.1.0.dist-info"}, tops
    for needed in ("dwc/passes/load.py", "dwc/targets/cpu-bf16.yaml",
                   "dwc/templates/bundle_README.md.j2", "dwc/cli/__init__.py"):
        assert needed in names
    # every subpackage of the source tree is in pyproject.toml's list, so in the wheel
    for init in (ROOT / "dwc").rglob("__init__.py"):
        assert init.relative_to(ROOT).as_posix() in names, init


def test_console_script_and_help():
    exe = Path(sys.executable).parent / "dwc"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("build", "inspect", "targets", "passes"):
        assert command in out
    for command in ("build", "inspect", "targets", "passes"):
        result = dwc(command, "--help")
        assert result.exit_code == 0 and "--json" in result.stdout


def test_targets_and_passes_listings():
    import json

    targets = json.loads(dwc("targets", "--json").stdout)
    assert [t["name"] for t in targets] == ["a100-int4-awq", "a100-int8-sq", "cpu-bf16",
                                            "cpu-gguf-f16", "cpu-gguf-q4_k_m", "cpu-gguf-q8_0",
                                            "h100-fp8", "h100-int4-awq", "h100-trtllm-fp8",
                                            "h100-trtllm-int4-awq", "h200-fp8", "h200x2-fp8"]
    passes = json.loads(dwc("passes", "--json").stdout)
    assert [p["name"] for p in passes] == ["load", "calibrate", "quantize", "modelopt-quantize",
                                            "gguf-export", "fuse", "distill-draft", "kv-layout",
                                            "evaluate", "tune", "emit"]
    evaluate = next(p for p in passes if p["name"] == "evaluate")
    assert evaluate["reads"] == ["reference", "model", "tokenizer"] and evaluate["cacheable"]
    assert all(o["help"] for p in passes for o in p["options"])
