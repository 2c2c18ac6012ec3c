"""The bundle writer's order and atomicity, and the reader's checks."""

from __future__ import annotations

import json

import pytest

from dwc.bundle.reader import open_bundle, verify
from dwc.bundle.writer import BundleWriter
from dwc.errors import BundleError
from dwc.formats import manifest as mf

MANIFEST = {k: None for k in mf.KEYS} | {"schema": mf.SCHEMA, "name": "t"}


def write(out, files: dict[str, bytes], force=False):
    with BundleWriter(out, force=force) as w:
        for rel, data in files.items():
            w.write_bytes(rel, data)
        w.finalize(dict(MANIFEST))
        w.commit()


def test_commit_moves_a_complete_bundle_into_place(tmp_path):
    out = tmp_path / "b"
    write(out, {"model/a.json": b"abc", "README.md": b"hi"})
    m = open_bundle(out, full=True)
    assert m["files"]["model/a.json"]["bytes"] == 3 and set(m["files"]) == {"model/a.json", "README.md"}
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no staging leftovers


def test_failure_leaves_nothing_and_keeps_the_old_bundle(tmp_path):
    out = tmp_path / "b"
    write(out, {"x": b"old"})
    with pytest.raises(ValueError):
        with BundleWriter(out) as w:
            w.write_bytes("x", b"new")
            raise ValueError("boom")
    assert (out / "x").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["b"]
    write(out, {"x": b"new"})  # a later good build replaces the bundle
    assert (out / "x").read_bytes() == b"new"


def test_out_of_order_calls_are_refused(tmp_path):
    with BundleWriter(tmp_path / "b") as w:
        with pytest.raises(RuntimeError, match="needs finalized"):
            w.commit()
        w.finalize(dict(MANIFEST))
        with pytest.raises(RuntimeError, match="needs open"):
            w.write_bytes("late", b"x")
        w.commit()


def test_existing_non_bundle_output_needs_force(tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "user.txt").write_text("mine")
    with pytest.raises(BundleError, match="not a dwc bundle"):
        BundleWriter(out)
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="not a folder"):
        BundleWriter(tmp_path / "file", force=True)


def test_verify_lists_each_kind_of_difference(tmp_path):
    out = tmp_path / "b"
    write(out, {"a": b"1", "b": b"22", "c": b"333"})
    m = json.loads((out / mf.MANIFEST).read_text())
    (out / "a").write_bytes(b"9")           # same size, other bytes
    (out / "b").write_bytes(b"2")           # other size
    (out / "c").unlink()                    # missing
    (out / "extra").write_bytes(b"")        # not listed
    m["files"]["/etc/passwd"] = {"sha256": "0" * 64, "bytes": 1}
    problems = verify(out, m, full=True)
    assert problems == [
        "/etc/passwd: path leaves the bundle", "a: sha256 differs from the manifest",
        "b: size 1 differs from the manifest's 2", "c: missing", "extra: not listed in the manifest"]
    assert verify(out, m, full=False)[1] == "b: size 1 differs from the manifest's 2"
