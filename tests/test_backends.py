"""The backend interface (dwc/backends/base.py) is all the rest of dwc uses of a backend."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from dwc import backends
from dwc.backends.base import Backend
from dwc.errors import TargetError
from dwc.passes import REGISTRY
from dwc.compiler.target import all_targets

ROOT = Path(__file__).resolve().parents[1]
BACKEND_DIR = ROOT / "dwc" / "backends"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def _package(backend: Backend) -> str:
    return backend.name.replace("-", "_")


def test_every_backend_is_registered_and_implements_the_interface():
    assert set(backends.BACKENDS) == {"torch-triton", "gguf", "tensorrt-llm"}
    folders = {p.name for p in BACKEND_DIR.iterdir() if (p / "__init__.py").is_file()}
    assert folders == {_package(b) for b in backends.BACKENDS.values()}
    for name, backend in backends.BACKENDS.items():
        assert isinstance(backend, Backend) and backend.name == name and backend.description
        for method in ("emit", "eval_logits"):
            assert getattr(type(backend), method) is not getattr(Backend, method), (name, method)
        assert set(backend.own_passes) <= set(REGISTRY)
    assert {t.backend for t in all_targets()} <= set(backends.BACKENDS)


def test_nothing_outside_a_backend_imports_its_folder():
    """Outside dwc/backends/<name>/, only the registry (`dwc.backends`) and the interface
    (`dwc.backends.base`) are imported; the exception is a backend's own passes (its
    exporter, its quantizer), which belong to it."""
    own = {Path(REGISTRY[p].__module__.replace(".", "/") + ".py").name: _package(b)
           for b in backends.BACKENDS.values() for p in b.own_passes}
    files = [p for p in (ROOT / "dwc").rglob("*.py") if BACKEND_DIR not in p.parents]
    files += list((ROOT / "passes").glob("*.py"))
    assert len(files) > 60
    for path in files:
        allowed = own.get(path.name) if path.parent.name == "passes" else None
        for name in _imports(path):
            parts = name.split(".")
            if parts[:2] != ["dwc", "backends"] or len(parts) < 3:
                continue
            assert parts[2] in ("base", "BACKENDS", "get") or parts[2] == allowed, \
                f"{path.relative_to(ROOT)} imports {name}"


def test_no_branch_on_a_backend_name_outside_the_backends():
    names = set(backends.BACKENDS)
    files = [p for p in (ROOT / "dwc").rglob("*.py") if BACKEND_DIR not in p.parents]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                for side in [node.left, *node.comparators]:
                    assert not (isinstance(side, ast.Constant) and side.value in names), \
                        f"{path.relative_to(ROOT)}:{node.lineno} compares with {side.value!r}"


def _target(**changes):
    base = next(t for t in all_targets() if t.name == "cpu-bf16")
    return dataclasses.replace(base, **changes)


def test_a_new_backend_is_one_registry_entry(monkeypatch):
    """A target naming an unregistered backend is refused; registered, it is accepted and
    asked about the model."""
    seen = []

    class Toy(Backend):
        name = "toy"
        description = "a test backend"

        def check_model(self, target, info):
            seen.append(info)

    with pytest.raises(TargetError, match="backend: 'toy' is not one of"):
        _target(backend="toy").validate("t")
    monkeypatch.setitem(backends.BACKENDS, "toy", Toy())
    target = _target(backend="toy")
    target.validate("t")

    class Info:
        config = {"head_dim": 8}
        head_dim, hidden_size, num_heads = 8, 32, 4

    target.check_model(Info)
    assert seen == [Info]


def test_a_target_may_not_run_another_backends_own_pass():
    with pytest.raises(TargetError, match="gguf-export is a pass of gguf bundles"):
        _target(passes=["load", "gguf-export", "emit"]).validate("t")
    with pytest.raises(TargetError, match="tensor parallelism is for the torch-triton"):
        _target(backend="gguf", passes=["load", "gguf-export", "emit"],
                tensor_parallel=2).validate("t")
