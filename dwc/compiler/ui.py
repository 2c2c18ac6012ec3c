"""Progress for people: one line per pass with its timing, and bars for long loops.

Everything goes to stderr, so `--json` output on stdout stays machine-readable.
"""

from __future__ import annotations

import contextlib
import sys

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn


class Reporter:
    def __init__(self, quiet: bool = False):
        self.console = Console(file=sys.stderr, quiet=quiet, highlight=False)

    def info(self, text: str) -> None:
        self.console.print(text)

    def warn(self, text: str) -> None:
        self.console.print(f"[yellow]warning:[/] {text}")

    def pass_started(self, name: str, index: int, total: int) -> None:
        self.console.print(f"[{index}/{total}] {name} ...")

    def pass_finished(self, name: str, seconds: float, cached: bool, summary: str) -> None:
        how = "cached" if cached else f"{seconds:.1f}s"
        tail = f"  {summary}" if summary else ""
        self.console.print(f"      {name} done ({how}){tail}")

    @contextlib.contextmanager
    def status(self, description: str):
        """A spinner for a step that reports no progress of its own."""
        with self.console.status(f"      {description}"):
            yield

    @contextlib.contextmanager
    def progress(self, description: str, total: int):
        """A bar for `total` steps; yields a function that advances it by n (and, given
        `status`, shows that text beside the bar, e.g. the current loss)."""
        bar = Progress(TextColumn("      {task.description}"), BarColumn(),
                       TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                       console=self.console, transient=True)
        with bar:
            task = bar.add_task(description, total=total)

            def advance(n: int = 1, status: str | None = None) -> None:
                bar.advance(task, n)
                if status is not None:
                    bar.update(task, description=f"{description}  {status}")
            yield advance
