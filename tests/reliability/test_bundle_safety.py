"""Bundle integrity and safety (issue 10): hypothesis draws tampered copies of the shared
bundle — manifest paths that leave the bundle, symlinks in or out of it, pickles by name
or by content (listed in the manifest with their true hashes, so only the pickle check
can catch them), broken manifests — and every command that loads a bundle (inspect,
inspect --verify, bench, diff) must refuse each with one `error:` line and exit 2.
Derandomized and bounded: about 120 cases; copies are hard links, so each is cheap.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from dwc.bundle.hashing import sha256_file
from tests.conftest import assert_clean_error, dwc
from tests.reliability.test_generated_bad_input import bounded

COMMANDS = [("inspect",), ("inspect", "--verify"),
            ("bench", "--num-prompts", "1", "--input-len", "4", "--output-len", "2",
             "--requests", "1", "--no-baseline"),
            ("diff", "BUNDLE")]

ESCAPES = st.one_of(
    st.sampled_from(["../outside.txt", "/etc/passwd", "model/../../outside.txt",
                     "model\\..\\..\\outside.txt", "./model/config.json", "model//config.json",
                     "reports/../../outside.txt"]),
    st.tuples(st.lists(st.sampled_from(["..", "model", "reports", "x"]), max_size=2),
              st.lists(st.sampled_from(["..", "model", "x", "config.json"]), min_size=1,
                       max_size=2)).map(lambda ab: "/".join([*ab[0], "..", *ab[1]])))

PICKLE_NAMES = st.sampled_from(["model/extra.bin", "model/weights.pt", "reports/data.pkl",
                                "draft.ckpt", "model/arrays.npy", "model/state.pth"])
INNOCENT_NAMES = st.sampled_from(["model/extra.json", "reports/notes.txt", "model/vocab.txt",
                                  "serve/readme.md"])


def pickle_bytes(kind: str) -> bytes:
    if kind == "pickle":
        return pickle.dumps({"run": "code"}, protocol=4)
    buffer = io.BytesIO()  # the layout torch.save writes: a zip with data.pkl inside
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps([1, 2], protocol=2))
    return buffer.getvalue()


TAMPERING = st.one_of(
    st.tuples(st.just("escape"), ESCAPES),
    st.tuples(st.just("pickle-name"), PICKLE_NAMES),
    st.tuples(st.just("pickle-bytes"), st.tuples(INNOCENT_NAMES,
                                                 st.sampled_from(["pickle", "torch"]))),
    st.tuples(st.just("symlink-out"), st.sampled_from(["model/config.json", "reports/quality.json",
                                                       "model/tokenizer.json"])),
    st.tuples(st.just("symlink-in"), st.just("reports/alias.json")),
    st.tuples(st.just("manifest"), st.sampled_from(
        ["files-list", "entry-string", "entry-no-sha", "schema", "truncated", "not-object"])),
)


# What the refusal names, per kind of tampering (inspect --verify lists every problem).
EXPECTED = {"escape": ["leaves the bundle"], "pickle-name": ["a pickle"],
            "pickle-bytes": ["a pickle"], "symlink-out": ["symlink"], "symlink-in": ["symlink"],
            "manifest": ["manifest lacks", "malformed manifest entry", "unsupported schema",
                         "invalid JSON"]}


def tamper(bundle: Path, copy: Path, outside: Path, kind: str, arg) -> None:
    shutil.copytree(bundle, copy, copy_function=os.link)  # hard links: no bytes copied
    path = copy / "manifest.json"
    manifest = json.loads(path.read_text())
    path.unlink()  # never write through a hard link into the shared bundle

    def add(rel: str, data: bytes) -> None:
        target = copy / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        manifest["files"][rel] = {"sha256": sha256_file(target, memo=False), "bytes": len(data)}

    if kind == "escape":
        manifest["files"][arg] = {"sha256": sha256_file(outside, memo=False),
                                  "bytes": outside.stat().st_size}
    elif kind == "pickle-name":
        add(arg, b"harmless bytes, dangerous name")
    elif kind == "pickle-bytes":
        add(arg[0], pickle_bytes(arg[1]))
    elif kind == "symlink-out":
        (copy / arg).unlink()
        (copy / arg).symlink_to(outside)
    elif kind == "symlink-in":
        (copy / arg).symlink_to(copy / "reports" / "quality.json")
    path.write_text(json.dumps(manifest))
    if kind == "manifest":
        broken = {"files-list": lambda m: {**m, "files": list(m["files"])},
                  "entry-string": lambda m: {**m, "files": {k: "x" for k in m["files"]}},
                  "entry-no-sha": lambda m: {**m, "files": {k: {"bytes": v["bytes"]}
                                                            for k, v in m["files"].items()}},
                  "schema": lambda m: {**m, "schema": "dwc.bundle/999"},
                  "not-object": lambda m: [m]}
        text = path.read_text()[:200] if arg == "truncated" else json.dumps(broken[arg](manifest))
        path.write_text(text)


@bounded(120)
@given(tampering=TAMPERING, command=st.sampled_from(COMMANDS))
def test_tampered_bundles_are_refused_by_every_command(bundle, tmp_path_factory, tampering,
                                                       command):
    work = tmp_path_factory.mktemp("tampered")
    outside = work / "outside.txt"
    outside.write_text("not part of the bundle\n")
    copy = work / "bundle"
    tamper(bundle, copy, outside, *tampering)
    args = [str(bundle) if a == "BUNDLE" else a for a in command]
    result = dwc(*args[:1], copy, *args[1:])
    assert_clean_error(result, 2)
    assert any(f in result.stderr for f in EXPECTED[tampering[0]]), result.stderr
    assert outside.read_text() == "not part of the bundle\n"


def test_a_pickle_is_named_and_the_intact_bundle_still_loads(bundle, tmp_path):
    copy = tmp_path / "bundle"
    outside = tmp_path / "outside.txt"
    outside.write_text("x")
    tamper(bundle, copy, outside, "pickle-bytes", ("reports/notes.txt", "torch"))
    line = assert_clean_error(dwc("inspect", copy), 2)
    assert "reports/notes.txt: a pickle" in line
    # the same copy, untampered: the hard-linked copy itself loads and verifies
    shutil.rmtree(copy)
    tamper(bundle, copy, outside, "none", None)
    assert dwc("inspect", "--verify", copy).exit_code == 0
    assert dwc("inspect", copy).exit_code == 0
