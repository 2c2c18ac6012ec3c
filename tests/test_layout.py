"""The house rules of docs/ARCHITECTURE.md, checked on the source: no import circle, no
arrow from the runtime to the compiler wing, small files and functions."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from dwc.constants import VERSION

ROOT = Path(__file__).resolve().parents[1]
MAX_FILE_LINES = 300
MAX_FUNCTION_LINES = 50
# The runtime may import these parts of dwc and nothing else (the model wing, the
# bundle reader, formats, constants, errors).
RUNTIME_MAY_IMPORT = ("dwc.runtime", "dwc.model", "dwc.bundle", "dwc.formats",
                      "dwc.constants", "dwc.errors")


def _modules() -> dict[str, Path]:
    mods = {}
    for p in (ROOT / "dwc").rglob("*.py"):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    for p in (ROOT / "passes").glob("*.py"):
        mods["dwc.passes" + ("" if p.stem == "__init__" else f".{p.stem}")] = p
    return mods


def _imports(path: Path, mods: dict) -> set[str]:
    """The dwc modules `path` imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dwc"):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                out.add(full if full in mods else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("dwc"))
    return {m for m in out if m in mods}


def test_the_import_graph_has_no_circle():
    mods = _modules()
    graph = {m: _imports(p, mods) - {m} for m, p in mods.items()}
    done, path = set(), []

    def visit(m):
        if m in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        path.append(m)
        for n in sorted(graph[m]):
            visit(n)
        path.pop()
        done.add(m)

    assert len(mods) > 100
    for m in sorted(graph):
        visit(m)


def test_the_runtime_imports_no_compiler_module():
    mods = _modules()
    for name, path in mods.items():
        if name.startswith("dwc.runtime"):
            for m in _imports(path, mods):
                assert m.startswith(RUNTIME_MAY_IMPORT), f"{name} imports {m}"


def _is_triton_kernel(node) -> bool:
    return any("jit" in ast.unparse(d) for d in node.decorator_list)


def test_files_and_functions_are_small():
    """Triton kernels are exempt from the function rule: a kernel is one program's body,
    its loops unrolled by the compiler (docs/ARCHITECTURE.md)."""
    big = []
    for path in _modules().values():
        text = path.read_text()
        if text.count("\n") > MAX_FILE_LINES:
            big.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                    not _is_triton_kernel(node):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    big.append(f"{path.relative_to(ROOT)}: {node.name} {length} lines")
    assert not big, big


def test_comments_point_inside_the_repository():
    for path in _modules().values():
        assert "DESIGN.md" not in path.read_text(), f"{path.relative_to(ROOT)} cites DESIGN.md"


def test_the_version_is_stated_once_more_only_in_pyproject():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^version = "(.*)"$', pyproject, re.M).group(1) == VERSION


def _top_level_names(path: Path) -> set[str] | None:
    """Names a module defines at its top level; None when it has a module __getattr__."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.If, ast.Try)):  # TYPE_CHECKING blocks, fallbacks
            names.update(n.id for n in ast.walk(node) if isinstance(n, ast.Name))
    return None if "__getattr__" in names else names


def test_every_dwc_import_resolves_without_a_gpu():
    """Each `from dwc.x import y` anywhere (function-level ones included, in the GPU-only
    code and tests too) names a module or a top-level name that exists: checked from the
    source, so the Triton files that cannot be imported here are covered."""
    mods = _modules()
    files = list(mods.values()) + list((ROOT / "tests").rglob("*.py")) + \
        list((ROOT / "benchmarks").glob("*.py"))
    missing = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dwc")):
                continue
            if node.module not in mods:
                missing.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.module}")
                continue
            defined = _top_level_names(mods[node.module])
            for a in node.names:
                if defined is not None and a.name not in defined and \
                        f"{node.module}.{a.name}" not in mods:
                    missing.append(f"{path.relative_to(ROOT)}:{node.lineno} "
                                   f"{node.module}.{a.name}")
    assert not missing, missing
