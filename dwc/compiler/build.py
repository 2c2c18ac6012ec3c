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
from dwc.passes import REGISTRY
from dwc.compiler.pipeline import BuildContext, plan, run
from dwc.compiler.target import load_target
from dwc.compiler.ui import Reporter
from dwc.compiler.output import OWNER, check_output, remove_abandoned


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
