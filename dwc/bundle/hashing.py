"""sha256 of files and of JSON-able values; the pass cache and the manifest build on these."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from dwc.constants import HASH_CHUNK, cache_dir


def sha256_file(path: Path, memo: bool = True) -> str:
    """Hex sha256 of a file's bytes.

    With `memo`, the digest is remembered under the cache folder, keyed by the file's
    absolute path, size, mtime and inode, so a 16 GB checkpoint is hashed once, not on
    every build. A changed file changes its mtime or size, so its key misses.
    """
    path = Path(path)
    st = path.stat()
    key = sha256_json([str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino])
    memo_file = cache_dir() / "filehash" / key[:2] / key
    if memo and memo_file.is_file():
        digest = memo_file.read_text().strip()
        if len(digest) == 64:
            return digest
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    if memo:
        _write_memo(memo_file, digest)
    return digest


def _write_memo(memo_file: Path, digest: str) -> None:
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(digest)
        tmp.replace(memo_file)
    except OSError:
        pass  # a read-only or full cache only costs a re-hash next time


def sha256_json(value) -> str:
    """Hex sha256 of a JSON-able value, with sorted keys so equal values hash equal."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()
