"""User-facing errors. The CLI turns each into one line and its exit code (README.md,
"Commands").

Raise a subclass of DwcError for anything the user can fix; any other exception is a bug
or an environment failure and leaves with exit 1.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_PASS_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_QUALITY = 3
EXIT_SLO = 4


class DwcError(Exception):
    """Base class: a message for one line and the exit code it leaves with."""

    exit_code = EXIT_PASS_FAILED

    def __init__(self, message: str, *, pass_name: str | None = None):
        super().__init__(message)
        self.message = message
        self.pass_name = pass_name


class BadInput(DwcError):
    """Bad usage, build file, target or input file: exit 2."""

    exit_code = EXIT_BAD_INPUT


class BuildFileError(BadInput):
    """A build-file problem; the message names the field path (e.g. `calibration.samples`)."""


class TargetError(BadInput):
    """Unknown target, or a target that cannot work on the model."""


class CheckpointError(BadInput):
    """A checkpoint or adapter that cannot be loaded; the message names the file."""


class BundleError(BadInput):
    """A bundle that does not match its manifest, or a path that is not a bundle."""


class PassFailed(DwcError):
    """A pass broke for a reason that is not the user's input: exit 1."""


class QualityBudgetExceeded(DwcError):
    """The optimized model lost more quality than the build file allows: exit 3."""

    exit_code = EXIT_QUALITY


class SloNotMet(DwcError):
    """The SLO cannot be met and the build file asks to enforce it: exit 4."""

    exit_code = EXIT_SLO
