"""The build file: dataclasses, validation with field paths, --set overrides, paths."""

from __future__ import annotations

import pytest

from dwc.compiler.buildfile import load_buildfile
from dwc.errors import BadInput, BuildFileError
from dwc.passes import REGISTRY
from tests.conftest import write_buildfile


def load(path, *overrides):
    return load_buildfile(path, list(overrides), pass_names=REGISTRY)


def test_example_loads_with_defaults_and_resolved_paths(example):
    build = load(example / "model.yaml")
    assert build.name == "stdlib-coder"
    assert build.model == (example / "checkpoint").resolve()
    assert build.calibration.data == (example / "calib.txt").resolve()
    assert build.calibration.samples == 32 and build.evaluation.seq_len == 256
    assert build.adapter is None and build.slo is None and build.optimization == "auto"
    assert build.passes == {}


def test_relative_paths_resolve_against_the_build_file_folder(example, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "c.txt").write_text("def f():\n    return 1\n")
    path = write_buildfile(tmp_path, example, **{"calibration.data": "./data/c.txt"})
    assert load(path).calibration.data == tmp_path / "data" / "c.txt"


@pytest.mark.parametrize("changes, fragment", [
    ({"colour": "blue"}, "colour: unknown key"),
    ({"calibration.sample": 3}, "calibration.sample: unknown key"),
    ({"calibration.samples": "many"}, "calibration.samples: expected int"),
    ({"calibration.samples": 0}, "calibration.samples: must be greater than 0"),
    ({"calibration.samples": True}, "calibration.samples: expected int"),
    ({"evaluation.max_ppl_increase_pct": -1}, "evaluation.max_ppl_increase_pct: must be >= 0"),
    ({"slo": {"target_rps": "fast"}}, "slo.target_rps: expected float"),
    ({"slo": {"max_context": 0}}, "slo.max_context: must be greater than 0"),
    ({"name": None}, "name: required key is missing"),
    ({"name": "bad/name"}, "name: 'bad/name' must be"),
    ({"evaluation": None}, "evaluation: required key is missing"),
    ({"draft": "sometimes"}, "draft"),
    ({"optimization": "fast"}, "optimization: expected auto or list of str"),
    ({"passes": {"evaluate": ["x"]}}, "passes.evaluate: expected a mapping"),
    ({"model": "/nonexistent/model"}, "model: /nonexistent/model: model folder not found"),
    ({"calibration.data": "/nonexistent/c.txt"}, "calibration.data: /nonexistent/c.txt: file not found"),
    ({"evaluation.data": "/etc"}, "evaluation.data: /etc: not a file"),
])
def test_bad_fields_are_named(example, tmp_path, changes, fragment):
    path = write_buildfile(tmp_path, example, **changes)
    with pytest.raises(BuildFileError) as e:
        load(path)
    assert fragment in e.value.message
    assert e.value.message.startswith(str(path))
    assert e.value.exit_code == 2


def test_empty_and_malformed_files(example, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    path = write_buildfile(tmp_path, example, **{"evaluation.data": str(empty)})
    with pytest.raises(BuildFileError, match="evaluation.data: .*holds no text"):
        load(path)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: x\nmodel: [unclosed\n")
    with pytest.raises(BuildFileError, match=r"bad.yaml:\d+: invalid YAML"):
        load(bad_yaml)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(BuildFileError, match="expected a mapping"):
        load(scalar)
    with pytest.raises(BadInput, match="build file not found"):
        load(tmp_path / "missing.yaml")


def test_set_overrides_fields_and_pass_options(example, tmp_path):
    path = write_buildfile(tmp_path, example)
    build = load(path, "calibration.samples=5", "evaluation.max_ppl_increase_pct=0.5",
                 "evaluate.batch_size=2", "slo.target_latency_ms=40")
    assert build.calibration.samples == 5
    assert build.evaluation.max_ppl_increase_pct == 0.5
    assert build.passes == {"evaluate": {"batch_size": 2}}
    assert build.slo.target_latency_ms == 40.0
    with pytest.raises(BadInput, match="expected key=value"):
        load(path, "calibration.samples")
    with pytest.raises(BuildFileError, match="calibration.samples: expected int"):
        load(path, "calibration.samples=lots")


def test_jsonl_data_text_and_chat(example, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "print(1)"}\n\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    build = load(write_buildfile(tmp_path, example, **{"calibration.data": str(data)}))
    assert build.calibration.data == data
    data.write_text('{"text": "ok"}\n{"prompt": "no"}\n')
    with pytest.raises(BuildFileError, match=r"d.jsonl:2: expected"):
        load(write_buildfile(tmp_path, example, **{"calibration.data": str(data)}))
    data.write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(BuildFileError, match=r"d.jsonl:2: invalid JSON"):
        load(write_buildfile(tmp_path, example, **{"calibration.data": str(data)}))
    wrong = tmp_path / "d.csv"
    wrong.write_text("a,b\n")
    with pytest.raises(BuildFileError, match="unsupported data format"):
        load(write_buildfile(tmp_path, example, **{"calibration.data": str(wrong)}))
