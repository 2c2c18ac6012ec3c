"""Hardware names for `dwc build --target`: `auto`, or a hardware alone (`h100`, `cpu`),
means "search the targets of that hardware" (docs/SEARCH.md).

A target's hardware is its name's first word: `h100-fp8` and `h100-int4-awq` are `h100`,
`cpu-gguf-q8_0` is `cpu`, `h200x2-fp8` is `h200x2` (two GPUs are another machine). The
targets folder is the hardware table: nothing else lists them.
"""

from __future__ import annotations

from dwc.compiler.target import Target, all_targets, target_names
from dwc.errors import TargetError

AUTO = "auto"


def hardware_of(target_name: str) -> str:
    return target_name.split("-", 1)[0]


def hardware_names() -> list[str]:
    return sorted({hardware_of(n) for n in target_names()})


def is_search(name: str) -> bool:
    """`auto`, or a hardware name that is not itself a target's name."""
    return name == AUTO or (name in hardware_names() and name not in target_names())


def check_name(name: str) -> None:
    """A --target value is a target, a hardware or `auto`; else one line naming them."""
    if name != AUTO and name not in target_names() and name not in hardware_names():
        raise TargetError(f"unknown target {name!r} (targets: {', '.join(target_names())}; "
                          f"or a hardware to search: {', '.join(hardware_names())}, {AUTO})")


def resolve(name: str) -> str:
    """The hardware a --target value names: `auto` is this machine's (a CUDA GPU whose
    name matches a target's hardware, else cpu)."""
    if name != AUTO:
        if name not in hardware_names():
            raise TargetError(f"unknown hardware {name!r} (known: {', '.join(hardware_names())}, "
                              f"or {AUTO})")
        return name
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    gpu = torch.cuda.get_device_name(0)
    words = gpu.lower().split()
    for t in all_targets():
        if t.device == "cuda" and t.tensor_parallel == 1 and \
                all(w in t.hardware.name.lower().split() for w in words):
            return hardware_of(t.name)
    raise TargetError(f"--target auto: no target's hardware matches the GPU {gpu!r} "
                      f"(known: {', '.join(hardware_names())})")


def targets_of(hardware: str, only: list[str] | None = None) -> list[Target]:
    """The targets of `hardware`, in name order; `only` (the build file's search.targets)
    keeps those it names, each of which must be one of them."""
    mine = [t for t in all_targets() if hardware_of(t.name) == hardware]
    if only is None:
        return mine
    names = [t.name for t in mine]
    for name in only:
        if name not in names:
            raise TargetError(f"search.targets: {name!r} is not a target of {hardware} "
                              f"(its targets: {', '.join(names)})")
    return [t for t in mine if t.name in only]
