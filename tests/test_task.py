"""Evaluation tasks: the JSONL format and its errors, the build-file field, scoring items
with the example model (dwc/quality/task.py), the verdict (dwc/quality/gate.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dwc.compiler.buildfile import Task, load_buildfile
from dwc.errors import BadInput, BuildFileError
from dwc.passes import REGISTRY
from dwc.quality.gate import task_verdict
from dwc.quality.paired import compare_paired
from dwc.quality.task import choose, continue_greedily, encode_pair, read_task
from tests.conftest import write_buildfile

GOOD_MC = {"prompt": "x = ", "choices": ["1", "2"], "answer": 1}
GOOD_EM = {"prompt": "import", "answer": "os"}


def write_task(path: Path, *lines) -> Path:
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


def test_the_example_task_reads():
    items = read_task(Path(__file__).parents[1] / "examples" / "stdlib-coder" / "task.jsonl")
    assert len(items) == 56 and sum(i.choices is not None for i in items) == 48
    assert all(i.choices is None or i.choices[i.answer] for i in items)


@pytest.mark.parametrize("line, fragment", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected an object"),
    (dict(GOOD_MC, colour="red"), '"colour": unknown key'),
    ({"answer": "os"}, '"prompt": expected a non-empty string'),
    ({"prompt": "  ", "answer": "os"}, '"prompt": expected a non-empty string'),
    ({"prompt": "import"}, '"answer": expected a non-empty string'),
    ({"prompt": "import", "answer": 3}, '"answer": expected a non-empty string'),
    (dict(GOOD_MC, choices="1 or 2"), '"choices": expected a list of at least 2'),
    (dict(GOOD_MC, choices=["1"]), '"choices": expected a list of at least 2'),
    (dict(GOOD_MC, choices=["1", ""]), '"choices": expected a list of at least 2'),
    (dict(GOOD_MC, answer=2), '"answer": expected the index of the right choice, 0 to 1'),
    (dict(GOOD_MC, answer="2"), '"answer": expected the index'),
    (dict(GOOD_MC, answer=True), '"answer": expected the index'),
    (dict(GOOD_MC, id=[1]), '"id": expected a string or an integer'),
])
def test_bad_items_name_the_file_the_line_and_the_key(tmp_path, line, fragment):
    path = write_task(tmp_path / "t.jsonl", GOOD_EM, "", line)
    with pytest.raises(BadInput) as e:
        read_task(path)
    assert e.value.message.startswith(f"{path}:3: ") and fragment in e.value.message
    assert "\n" not in e.value.message and e.value.exit_code == 2


def test_bad_task_files(tmp_path):
    for path, fragment in ((tmp_path / "none.jsonl", "file not found"),
                           (write_task(tmp_path / "t.txt", GOOD_EM), "a task is a .jsonl file"),
                           (write_task(tmp_path / "empty.jsonl", ""), "holds no items")):
        with pytest.raises(BadInput, match=fragment):
            read_task(path)
    (tmp_path / "latin.jsonl").write_bytes(b'{"prompt": "\xe9", "answer": "a"}\n')
    with pytest.raises(BadInput, match="not UTF-8"):
        read_task(tmp_path / "latin.jsonl")


def load(path, *overrides):
    return load_buildfile(path, list(overrides), pass_names=REGISTRY)


def test_the_build_file_field(example, tmp_path):
    task = write_task(tmp_path / "t.jsonl", GOOD_MC, GOOD_EM)
    build = load(write_buildfile(tmp_path, example, **{"evaluation.task": {"path": "t.jsonl"}}))
    assert build.evaluation.task == Task(path=task, margin=0.05, required=False,
                                         max_new_tokens=32)
    plain = load(write_buildfile(tmp_path / "plain", example))
    assert plain.evaluation.task is None
    via_set = load(write_buildfile(tmp_path / "s", example), f"evaluation.task.path={task}",
                   "evaluation.task.required=true", "evaluation.task.margin=0.02")
    assert via_set.evaluation.task == Task(path=task, margin=0.02, required=True)


@pytest.mark.parametrize("task, fragment", [
    ({"path": "t.jsonl", "margin": 2}, "evaluation.task.margin: must be between 0 and 1"),
    ({"path": "t.jsonl", "margin": -0.1}, "evaluation.task.margin: must be between 0 and 1"),
    ({"path": "t.jsonl", "max_new_tokens": 0}, "evaluation.task.max_new_tokens: must be greater"),
    ({"path": "t.jsonl", "colour": 1}, "evaluation.task.colour: unknown key"),
    ({"margin": 0.1}, "evaluation.task.path: required key is missing"),
    ({"path": "none.jsonl"}, "evaluation.task.path: "),
    ({"path": "bad.jsonl"}, 'evaluation.task.path: {tmp}/bad.jsonl:2: "choices": expected'),
])
def test_bad_task_fields_are_named(example, tmp_path, task, fragment):
    write_task(tmp_path / "t.jsonl", GOOD_MC)
    write_task(tmp_path / "bad.jsonl", GOOD_MC, dict(GOOD_MC, choices=[]))
    path = write_buildfile(tmp_path, example, **{"evaluation.task": task})
    with pytest.raises(BuildFileError) as e:
        load(path)
    assert fragment.format(tmp=tmp_path) in e.value.message
    assert e.value.message.startswith(str(path)) and "\n" not in e.value.message


@pytest.fixture(scope="module")
def reference(example):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(example / "checkpoint").eval()
    return model, AutoTokenizer.from_pretrained(example / "checkpoint")


def hf(model):
    return lambda ids: model(ids).logits


def test_encode_pair_moves_the_prompts_trailing_space(reference):
    _, tok = reference
    ctx, cont = encode_pair(tok, "return ", "self.x")
    assert ctx == tok("return", add_special_tokens=False)["input_ids"]
    assert ctx + cont == tok("return self.x", add_special_tokens=False)["input_ids"]


def test_choices_batched_and_padded_pick_what_one_at_a_time_picks(example, reference):
    """Right padding and batching do not change a choice's log-likelihood."""
    model, tok = reference
    items = [i for i in read_task(example / "task.jsonl") if i.choices][:6]
    for item in items:
        scores = []
        for choice in item.choices:
            ctx, cont = encode_pair(tok, item.prompt, choice)
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                lp = torch.log_softmax(model(ids).logits[0].double(), -1)
            scores.append(sum(lp[len(ctx) + j - 1, t].item() for j, t in enumerate(cont)))
        assert choose(item, tok, hf(model), 256) == max(range(len(scores)), key=scores.__getitem__)


def test_greedy_continuation_is_what_generate_gives(example, reference):
    model, tok = reference
    items = [i for i in read_task(example / "task.jsonl") if i.choices is None][:3]
    for item in items:
        ids = torch.tensor([tok(item.prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=10, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
        text = tok.decode(out[0, ids.shape[1]:]).lstrip().split("\n", 1)[0].strip()
        assert continue_greedily(item, tok, hf(model), 256, 10) == text


def test_a_long_choice_is_refused_naming_the_item(reference, tmp_path):
    model, tok = reference
    path = write_task(tmp_path / "t.jsonl", dict(GOOD_MC, choices=["1", " one" * 40]))
    with pytest.raises(BadInput, match=rf"{tmp_path}/t.jsonl:1: a choice is \d+ tokens"):
        choose(read_task(path)[0], tok, hf(model), 16)


def test_the_verdict_and_when_it_fails_the_build(tmp_path):
    stats = compare_paired([True] * 30, [i >= 6 for i in range(30)])
    summary = dict(stats, path="t.jsonl")
    assert task_verdict(summary, Task(path=tmp_path / "t.jsonl", margin=0.05)) is None
    assert summary["verdict"] == "not shown equivalent" and summary["equivalent"] is False
    reason = task_verdict(summary, Task(path=tmp_path / "t.jsonl", margin=0.05, required=True))
    assert "task t.jsonl: accuracy 1 -> 0.8 (n 30, lost 6, gained 0" in reason
    assert "is not inside +-0.05 (required)" in reason
    same = compare_paired([True, False] * 10, [True, False] * 10)
    assert task_verdict(same, Task(path=tmp_path / "t.jsonl", margin=0.0, required=True)) is None
    assert same["verdict"] == "equivalent" and same["margin"] == 0.0
