"""Generated bad input (issue 10): hypothesis draws broken build files and corrupted
checkpoints; every case must end in one `error:` line with exit code 2, no traceback, and
nothing at the output path. Derandomized (the same cases every run) and bounded: about
250 cases, a fraction of a second each (all fail before or in `load`).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.conftest import EXAMPLE, assert_clean_error, dwc, write_buildfile

def bounded(examples: int):
    """Derandomized (the same cases every run), no deadline, no example database."""
    return settings(max_examples=examples, derandomize=True, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))

# (key path, what a valid value is): positive ints, paths to files, names...
POSITIVE_INTS = ["calibration.samples", "calibration.seq_len", "evaluation.samples",
                 "evaluation.seq_len"]
FILES = ["calibration.data", "evaluation.data"]
JUNK = st.one_of(st.text(max_size=8), st.lists(st.integers(), max_size=3),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                 st.booleans(), st.floats(allow_nan=True))


def bad_value_for(key: str):
    if key in POSITIVE_INTS:
        return st.one_of(st.integers(max_value=0), st.text(min_size=1, max_size=6),
                         st.floats(allow_nan=True), st.lists(st.integers(), max_size=2))
    if key in FILES:
        return st.one_of(st.just("/no/such/file.txt"), st.integers(), st.lists(st.text()),
                         st.just(""))
    if key == "evaluation.max_ppl_increase_pct":
        return st.one_of(st.floats(max_value=-0.001), st.text(min_size=1, max_size=5),
                         st.lists(st.integers(), max_size=2))
    if key == "name":
        return st.one_of(st.just(""), st.just("has space"), st.just("../escape"),
                         st.integers(), st.just("x" * 300))
    if key == "model":
        return st.one_of(st.just("/no/such/model"), st.integers(), st.lists(st.text()))
    if key == "draft":
        return st.one_of(st.just("/no/such/draft"), st.integers(), st.just(["auto"]))
    if key == "optimization":
        return st.one_of(st.just(["load", "no-such-pass", "evaluate", "emit"]),
                         st.just("fast"), st.integers(), st.just(["emit", "load"]))
    if key.startswith("slo."):
        return st.one_of(st.integers(max_value=0), st.text(min_size=1, max_size=5))
    return JUNK


MUTATIONS = st.one_of(
    # a known key gets a value it cannot take
    st.sampled_from(POSITIVE_INTS + FILES + ["evaluation.max_ppl_increase_pct", "name", "model",
                                             "draft", "optimization", "slo.target_latency_ms",
                                             "slo.max_context"])
    .flatmap(lambda key: st.tuples(st.just(key), bad_value_for(key))),
    # an unknown key, at the top or inside a section
    st.tuples(st.sampled_from(["surprise", "calibration.surprise", "evaluation.colour",
                               "slo.fast", "passes.no-such-pass.x"]), JUNK),
    # a required key removed
    st.tuples(st.sampled_from(["name", "model", "calibration", "evaluation",
                               "calibration.data", "evaluation.data"]), st.none()),
)


@bounded(140)
@given(mutation=MUTATIONS)
def test_broken_build_files(mutation, tmp_path_factory):
    key, value = mutation
    folder = tmp_path_factory.mktemp("bf")
    bf = write_buildfile(folder, EXAMPLE, **{key: value})  # value None: the key is removed
    out = folder / "out"
    result = dwc("build", bf, "-t", "cpu-bf16", "-o", out)
    assert_clean_error(result, 2)
    assert not out.exists()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt") / "checkpoint"
    shutil.copytree(EXAMPLE / "checkpoint", folder)
    return folder


def header_length(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


CORRUPTIONS = st.one_of(
    st.tuples(st.just("truncate"), st.floats(min_value=0.0, max_value=0.999)),
    st.tuples(st.just("flip-header"), st.integers(min_value=0, max_value=10_000),
              st.integers(min_value=1, max_value=255)),
    st.tuples(st.just("header-json"), st.sampled_from(["dtype", "shape", "offsets"])),
    st.tuples(st.just("nonfinite"), st.sampled_from(["nan", "inf", "-inf"]),
              st.integers(min_value=0, max_value=10_000)),
    st.tuples(st.just("config"), st.sampled_from(["hidden_size", "num_hidden_layers",
                                                  "vocab_size", "intermediate_size"]),
              st.sampled_from([0, -1, 7, "x", None, 10 ** 9])),
    st.tuples(st.just("missing"), st.sampled_from(["tokenizer.json", "config.json",
                                                   "model.safetensors"])),
    st.tuples(st.just("index"), st.just("missing-shard")),
)


def _same_tensors(flipped: bytes, original: bytes) -> bool:
    """A flip inside __metadata__ or padding leaves a valid file: not a bad input."""
    try:
        a, b = json.loads(flipped), json.loads(original)
    except (ValueError, UnicodeDecodeError):
        return False
    a.pop("__metadata__", None)
    b.pop("__metadata__", None)
    return a == b


def corrupt(folder: Path, case) -> None:
    kind = case[0]
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    n = header_length(weights)
    if kind == "truncate":
        weights.write_bytes(bytes(data[: int(len(data) * case[1])]))
    elif kind == "flip-header":
        i = case[1] % (8 + n)
        data[i] ^= case[2]
        assume(not _same_tensors(bytes(data[8:8 + n]), weights.read_bytes()[8:8 + n]))
        weights.write_bytes(bytes(data))
    elif kind == "header-json":
        header = json.loads(bytes(data[8:8 + n]))
        name = sorted(k for k in header if k != "__metadata__")[0]
        entry = header[name]
        if case[1] == "dtype":
            entry["dtype"] = "I64" if entry["dtype"] != "I64" else "F16"
        elif case[1] == "shape":
            entry["shape"] = [s + 1 for s in entry["shape"]]
        else:
            entry["data_offsets"] = [entry["data_offsets"][0], entry["data_offsets"][1] + 4096]
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        weights.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data[8 + n:]))
    elif kind == "nonfinite":
        value = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}[case[1]]
        header = json.loads(bytes(data[8:8 + n]))
        name = sorted(k for k in header if k != "__metadata__" and
                      header[k]["dtype"] == "F32")[0]
        start, end = header[name]["data_offsets"]
        count = (end - start) // 4
        at = 8 + n + start + 4 * (case[2] % count)
        data[at:at + 4] = struct.pack("<f", value)
        weights.write_bytes(bytes(data))
    elif kind == "config":
        cfg = json.loads((folder / "config.json").read_text())
        cfg[case[1]] = case[2]
        (folder / "config.json").write_text(json.dumps(cfg))
    elif kind == "missing":
        (folder / case[1]).unlink()
    elif kind == "index":  # a sharded checkpoint whose index names a file that is not there
        header = json.loads(bytes(data[8:8 + n]))
        names = [k for k in header if k != "__metadata__"]
        weights.rename(folder / "model-00001-of-00002.safetensors")
        index = {"metadata": {}, "weight_map": {k: ("model-00001-of-00002.safetensors"
                                                    if i % 2 else
                                                    "model-00002-of-00002.safetensors")
                                                for i, k in enumerate(names)}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))


@bounded(110)
@given(case=CORRUPTIONS)
def test_corrupted_checkpoints(case, pristine, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    model = folder / "checkpoint"
    shutil.copytree(pristine, model)
    corrupt(model, case)
    bf = write_buildfile(folder / "bf", EXAMPLE, model=str(model))
    out = folder / "out"
    result = dwc("build", bf, "-t", "cpu-bf16", "-o", out)
    assert_clean_error(result, 2)
    assert not out.exists()
