"""`dwc build` as a function: build file + target -> checked plan -> passes -> bundle."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from dwc.compiler.buildfile import load_buildfile
from dwc.bundle.reader import read_manifest
from dwc.compiler.cache import PassCache
from dwc.model.checkpoint import model_info
from dwc.constants import cache_dir
from dwc.errors import BadInput
from dwc.passes import REGISTRY
from dwc.compiler.pipeline import BuildContext, plan, run
from dwc.compiler.target import load_target
from dwc.compiler.ui import Reporter


def build(build_file: Path, target_name: str, output: Path, overrides=(), use_cache=True,
          force=False, reporter: Reporter | None = None) -> dict:
    """Run the whole pipeline; returns the manifest of the bundle written at `output`.

    Everything the user can get wrong is checked before the first pass: the build file,
    the target, the model's config against the target, the pass order and options.
    """
    from dwc.compiler.hardware import check_name, is_search

    check_name(target_name)
    if is_search(target_name):  # `auto` or a hardware name: docs/SEARCH.md
        from dwc.compiler.search import search

        return search(build_file, target_name, output, overrides, use_cache, force, reporter)
    build_file = Path(build_file)
    config = load_buildfile(build_file, overrides, pass_names=REGISTRY)
    target = load_target(target_name)
    info = model_info(config.model)
    target.check_model(info)
    steps = plan(config, target, REGISTRY)
    output = Path(output).absolute()
    check_output(output, config)
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(output)
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.work-", dir=output.parent) as work:
        (Path(work) / OWNER).write_text(str(os.getpid()))
        ctx = BuildContext(build=config, build_path=build_file.resolve(), target=target,
                           info=info, output=output, workdir=Path(work), force=force,
                           reporter=reporter or Reporter())
        run(steps, ctx, PassCache(cache_dir(), enabled=use_cache))
    return read_manifest(ctx.artifacts.bundle)


OWNER = ".owner-pid"


def remove_abandoned(output: Path) -> None:
    """Scratch (`.NAME.work-*`), staging (`.partial-*`) and replaced (`.old-*`) folders of
    earlier builds of `output` whose process is gone: a build killed with SIGKILL cannot
    clean up after itself. When any earlier build of the same output still runs (its
    scratch folder names a live process), nothing is touched."""
    import shutil

    works = list(output.parent.glob(f".{output.name}.work-*"))
    for folder in works:
        try:
            pid = int((folder / OWNER).read_text())
        except (OSError, ValueError):
            return  # being created right now, or not ours: leave everything
        if _alive(pid):
            return
    for kind in ("work", "partial", "old"):
        for folder in output.parent.glob(f".{output.name}.{kind}-*"):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != 0


def check_output(output: Path, config) -> None:
    """Replacing the output must never delete the checkpoint or data it was built from."""
    inputs = [config.model, config.calibration.data, config.evaluation.data]
    if config.adapter:
        inputs.append(config.adapter)
    out = output.resolve()
    for path in inputs:
        path = Path(path).resolve()
        if path == out or path.is_relative_to(out):
            raise BadInput(f"-o {output}: the output path holds the build's input {path}")
