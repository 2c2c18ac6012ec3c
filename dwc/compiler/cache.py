"""The pass cache: results of cacheable passes, stored by content-hash key.

An entry is a folder `<cache>/passes/<pass>/<key>/` holding the pass's own output files
(`outputs/`), its report files (`reports/`), `metrics.json`, and `checksums.json` (sha256
of every other file). Entries are written into a temporary folder and renamed into place,
so concurrent builds and killed builds never leave half an entry; an entry whose files do
not match their checksums is treated as a miss and replaced.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from dwc.bundle.hashing import sha256_file

CHECKSUMS = "checksums.json"
METRICS = "metrics.json"


class PassCache:
    def __init__(self, root: Path, enabled: bool = True):
        self.root = Path(root) / "passes"
        self.enabled = enabled

    def entry(self, pass_name: str, key: str) -> Path:
        return self.root / pass_name / key

    def lookup(self, pass_name: str, key: str) -> Path | None:
        """The entry's folder if it exists and is intact, else None (a corrupt one is removed)."""
        if not self.enabled:
            return None
        folder = self.entry(pass_name, key)
        if not (folder / CHECKSUMS).is_file():
            return None
        if _intact(folder):
            return folder
        shutil.rmtree(folder, ignore_errors=True)
        return None

    def store(self, pass_name: str, key: str, write) -> None:
        """Create an entry: `write(folder)` fills a fresh folder, which then moves into place."""
        if not self.enabled:
            return
        final = self.entry(pass_name, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
        try:
            write(tmp)
            sums = {str(p.relative_to(tmp)): sha256_file(p, memo=False)
                    for p in sorted(tmp.rglob("*")) if p.is_file()}
            (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1, sort_keys=True))
            if final.is_dir() and _intact(final):
                return  # another build stored it first; it may be reading it now
            shutil.rmtree(final, ignore_errors=True)
            try:
                os.replace(tmp, final)
            except OSError:
                if not final.is_dir():  # else a concurrent build stored the same key first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _intact(folder: Path) -> bool:
    try:
        sums = json.loads((folder / CHECKSUMS).read_text())
        listed = set(sums)
        present = {str(p.relative_to(folder)) for p in folder.rglob("*")
                   if p.is_file() and p.name != CHECKSUMS}
        return listed == present and all(
            sha256_file(folder / rel, memo=False) == digest for rel, digest in sums.items())
    except (OSError, ValueError):
        return False
