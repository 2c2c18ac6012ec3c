"""BundleWriter: fills a staging folder, hashes it into the manifest, renames it into place.

Its states go open -> finalized -> committed, and it refuses calls out of that order (as
gguf-py's writer does), so a manifest can never describe files written after it. Until
`commit`, nothing exists at the output path; on any error `abort` removes the staging
folder. An existing bundle at the output path is replaced only once the new one is whole.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from dwc.bundle.reader import is_bundle
from dwc.errors import BundleError
from dwc.formats import manifest as mf
from dwc.bundle.hashing import sha256_file


class BundleWriter:
    def __init__(self, output: Path, force: bool = False):
        self.output = Path(output).absolute()
        check_output(self.output, force)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=f".{self.output.name}.partial-",
                                             dir=self.output.parent))
        self.state = "open"

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None or self.state != "committed":
            self.abort()

    def _need(self, state: str) -> None:
        if self.state != state:
            raise RuntimeError(f"bundle writer is {self.state}, this call needs {state}")

    def path(self, rel: str) -> Path:
        """A path inside the staging folder (parent folders created)."""
        self._need("open")
        p = self.staging / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.path(rel).write_bytes(data)

    def copy_file(self, rel: str, src: Path) -> None:
        shutil.copyfile(src, self.path(rel))

    def finalize(self, manifest: dict) -> dict:
        """Hash every staged file into manifest["files"] and write manifest.json."""
        self._need("open")
        files = {}
        for p in sorted(self.staging.rglob("*")):
            if p.is_symlink():
                raise RuntimeError(f"bundle writer refuses symlink {p}")
            if p.is_file():
                files[p.relative_to(self.staging).as_posix()] = {
                    "sha256": sha256_file(p, memo=False), "bytes": p.stat().st_size}
        manifest = {k: manifest.get(k) for k in mf.KEYS if k != "files"} | {"files": files}
        (self.staging / mf.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        self.state = "finalized"
        return manifest

    def commit(self) -> Path:
        """Move the finished bundle to the output path, replacing an older bundle there."""
        self._need("finalized")
        old = None
        if self.output.exists() or self.output.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{self.output.name}.old-", dir=self.output.parent))
            os.replace(self.output, old / "bundle")
        try:
            os.replace(self.staging, self.output)
        except OSError:
            if old is not None:
                os.replace(old / "bundle", self.output)  # put the old bundle back
            raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        self.state = "committed"
        return self.output

    def abort(self) -> None:
        if self.state != "committed":
            shutil.rmtree(self.staging, ignore_errors=True)
            self.state = "aborted"


def check_output(output: Path, force: bool) -> None:
    """An existing output path is replaced only if it is a dwc bundle, or with --force."""
    if not (output.exists() or output.is_symlink()):
        return
    if output.is_dir() and not output.is_symlink() and (is_bundle(output) or force):
        return
    if output.is_dir() and not output.is_symlink() and not any(output.iterdir()):
        return  # an empty folder holds nothing to lose
    if force and not output.is_dir():
        raise BundleError(f"{output}: exists and is not a folder; remove it yourself")
    raise BundleError(f"{output}: exists and is not a dwc bundle (use --force to replace it)")
