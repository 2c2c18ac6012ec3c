"""What every pass is: a name, what it reads and writes, typed options and `run(ctx)`.

Passes talk through named artifacts in the build context (`ctx.artifacts`, the typed
fields of dwc/compiler/artifacts.py). The pipeline checks before running anything that
each artifact a pass reads was written by an earlier pass (torch.fx's requires /
ensures), and caches the outputs of `cacheable` passes by a content hash of their inputs
and options.

Artifacts are never changed in place: a pass that changes the model writes a new object,
so earlier artifacts (the reference model above all) stay what they were.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from dwc.config import option, positive


@dataclass
class PassResult:
    """What a pass hands back: new artifacts, metrics for the manifest, report files."""

    outputs: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    reports: dict[str, bytes] = field(default_factory=dict)  # file name under reports/ -> bytes


@dataclass
class NoOptions:
    """For passes without options."""


@dataclass
class BatchOptions:
    """For passes that only run windows through models."""

    batch_size: int = option(4, help="windows per forward pass")

    def validate(self, path: str) -> None:
        positive(self, path, "batch_size")


class Pass:
    name: ClassVar[str]
    description: ClassVar[str]
    reads: ClassVar[tuple[str, ...]] = ()
    optional_reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type] = NoOptions
    # Cacheable passes implement save/load; their results are reused when the key matches.
    cacheable: ClassVar[bool] = False
    # Passes that change the model's numbers; the quality gate names them when it fails.
    lossy: ClassVar[bool] = False

    def key_material(self, ctx, options) -> Any:
        """Inputs other than artifacts that decide the result (data file hashes, ...)."""
        return None

    def run(self, ctx, options) -> PassResult:
        raise NotImplementedError

    def after(self, ctx, options, result: PassResult) -> None:
        """Runs after `run` or a cache hit alike: checks that must hold every build."""

    def save(self, outputs: dict[str, Any], folder: Path) -> None:
        raise NotImplementedError(f"{self.name} is not cacheable")

    def load(self, folder: Path, ctx) -> dict[str, Any]:
        raise NotImplementedError(f"{self.name} is not cacheable")
