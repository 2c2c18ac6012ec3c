"""Reading a bundle: its manifest, and checking every file against it.

Every command that loads a bundle calls `open_bundle`, which refuses a bundle whose files
do not match the manifest (sizes always; sha256 with `full=True`, as `inspect --verify`
does), whose manifest names paths that leave the bundle, that holds symlinks, or that
holds a pickle: by its name (.bin, .pt, .pkl, ...) or by its first bytes (a pickle's
protocol header, or a zip archive with a .pkl member, which is what torch.save writes).
Loading a pickle runs code; dwc's bundles hold safetensors, GGUF, JSON and text.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path, PurePosixPath

from dwc.errors import BundleError
from dwc.formats import hf
from dwc.formats import manifest as mf
from dwc.bundle.hashing import sha256_file


def is_bundle(path: Path) -> bool:
    try:
        data = json.loads((Path(path) / mf.MANIFEST).read_text())
        return isinstance(data, dict) and str(data.get("schema", "")).startswith("dwc.bundle/")
    except (OSError, ValueError):
        return False


def read_manifest(bundle: Path) -> dict:
    bundle = Path(bundle)
    path = bundle / mf.MANIFEST
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: not a folder")
    if not path.is_file():
        raise BundleError(f"{bundle}: not a dwc bundle (no {mf.MANIFEST})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != mf.SCHEMA:
        schema = manifest.get("schema") if isinstance(manifest, dict) else None
        raise BundleError(f"{path}: unsupported schema {schema!r} (this dwc reads {mf.SCHEMA})")
    for key in mf.LATER_KEYS:
        manifest.setdefault(key, None)
    missing = [k for k in mf.KEYS if k not in manifest]
    if missing or not isinstance(manifest["files"], dict):
        raise BundleError(f"{path}: manifest lacks {', '.join(missing) or 'a files mapping'}")
    return manifest


def verify(bundle: Path, manifest: dict, full: bool) -> list[str]:
    """Problems found, one line each (empty when the bundle matches its manifest)."""
    bundle = Path(bundle).resolve()
    problems = []
    for rel, entry in sorted(manifest["files"].items()):
        problem = _unsafe(bundle, rel) or _check_file(bundle / rel, entry, full)
        if problem:
            problems.append(f"{rel}: {problem}")
    for p in sorted(bundle.rglob("*")):
        rel = p.relative_to(bundle).as_posix()
        if p.is_symlink():
            problems.append(f"{rel}: symlink (bundles hold plain files only)")
        elif p.is_file() and pickled(p):
            problems.append(f"{rel}: a pickle (loading it would run code; bundles hold none)")
        elif p.is_file() and rel != mf.MANIFEST and rel not in manifest["files"]:
            problems.append(f"{rel}: not listed in the manifest")
    return problems


PICKLE_SUFFIXES = set(hf.PICKLE_SUFFIXES) | {".pickle", ".joblib", ".npy", ".npz"}
# Binary formats whose first bytes are a length or a magic that may look like a pickle's.
NOT_PICKLES = {".safetensors", ".gguf"}


def pickled(path: Path) -> bool:
    """A pickle by name, by its protocol header (0x80 then 2..5), or a zip archive with a
    .pkl member (torch.save)."""
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        return True
    if suffix in NOT_PICKLES:
        return False
    with open(path, "rb") as f:
        head = f.read(4)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True
    if head == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                return any(name.endswith(".pkl") for name in z.namelist())
        except (zipfile.BadZipFile, OSError):
            return False
    return False


def _unsafe(bundle: Path, rel: str) -> str | None:
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or "\\" in rel or rel != pure.as_posix():
        return "path leaves the bundle"
    real = Path(os.path.realpath(bundle / rel))
    if real != bundle / rel or not real.is_relative_to(bundle):
        return "path leaves the bundle (through a symlink)"
    return None


def _check_file(path: Path, entry, full: bool) -> str | None:
    if not isinstance(entry, dict) or not {"sha256", "bytes"} <= set(entry):
        return "malformed manifest entry"
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"size {size} differs from the manifest's {entry['bytes']}"
    if full and sha256_file(path, memo=False) != entry["sha256"]:
        return "sha256 differs from the manifest"
    return None


def open_bundle(bundle: Path, full: bool = False) -> dict:
    """The manifest of a bundle that matches it; BundleError naming what differs otherwise."""
    manifest = read_manifest(bundle)
    problems = verify(bundle, manifest, full)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise BundleError(f"{bundle}: bundle does not match its manifest: {problems[0]}{more}")
    return manifest
