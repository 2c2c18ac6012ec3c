"""The output folder of a build or a search: scratch folders of killed builds removed,
and an output that would overwrite the build's inputs refused."""

from __future__ import annotations

import os
from pathlib import Path

from dwc.errors import BadInput

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
