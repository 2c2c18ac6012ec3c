"""End to end: the example built with its evaluation task (examples/stdlib-coder/task.jsonl)
through a test-only build file; the manifest, reports, `dwc inspect`, `dwc diff`, the
cache, and exit 3 when the task is required and not shown equivalent."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import assert_clean_error, dwc, manifest_of, write_buildfile

SUMMARY_KEYS = ("path", "sha256", "multiple_choice", "exact_match", "n", "accuracy_before",
                "accuracy_after", "difference", "lost", "gained", "mcnemar_p", "ci",
                "confidence", "resamples", "seed", "margin", "required", "equivalent",
                "verdict")


def task_buildfile(folder, example, task_path, **task):
    return write_buildfile(folder, example, **{
        "evaluation.task": {"path": str(task_path), "max_new_tokens": 12, **task}})


@pytest.fixture(scope="module")
def task_bundle(example, tmp_path_factory):
    folder = tmp_path_factory.mktemp("task")
    out = folder / "bundle"
    result = dwc("build", task_buildfile(folder, example, example / "task.jsonl"),
                 "-t", "cpu-bf16", "-o", out)
    assert result.exit_code == 0, result.stderr
    return out


def test_the_manifest_records_the_paired_test(task_bundle):
    m = manifest_of(task_bundle)
    t = m["quality"]["task"]
    assert tuple(t) == SUMMARY_KEYS
    assert (t["n"], t["multiple_choice"], t["exact_match"]) == (56, 48, 8)
    assert (t["confidence"], t["resamples"], t["margin"], t["required"]) == (0.9, 2000, 0.05, False)
    report = json.loads((task_bundle / "reports" / "task.json").read_text())
    assert report["summary"] == t and len(report["items"]) == 56
    items = report["items"]
    assert t["accuracy_before"] == pytest.approx(sum(i["correct_before"] for i in items) / 56)
    assert t["accuracy_after"] == pytest.approx(sum(i["correct_after"] for i in items) / 56)
    assert t["lost"] == sum(i["correct_before"] and not i["correct_after"] for i in items)
    assert t["gained"] == sum(i["correct_after"] and not i["correct_before"] for i in items)
    low, high = t["ci"]
    assert low <= t["difference"] <= high
    assert t["equivalent"] == (-0.05 <= low and high <= 0.05)
    assert t["verdict"] == ("equivalent" if t["equivalent"] else "not shown equivalent")
    assert t["accuracy_before"] > 0.6  # the example model tells its code from shuffled words
    quality_report = json.loads((task_bundle / "reports" / "quality.json").read_text())
    assert quality_report["task"] == t
    evaluate = next(p for p in m["passes"] if p["name"] == "evaluate")
    assert evaluate["metrics"]["task_accuracy_after"] == t["accuracy_after"]


def test_inspect_shows_the_verdict(task_bundle):
    result = dwc("inspect", task_bundle)
    assert result.exit_code == 0, result.stderr
    text = " ".join(result.stdout.split())  # rich wraps long lines
    line = text[text.index("task task.jsonl"):]
    t = manifest_of(task_bundle)["quality"]["task"]
    assert f"task.jsonl: accuracy {t['accuracy_before']:.4f} -> {t['accuracy_after']:.4f}" in line
    assert "McNemar p" in line and "margin +-0.05" in line and t["verdict"] in line


def test_diff_shows_task_accuracy_when_both_bundles_have_one(task_bundle, bundle):
    both = json.loads(dwc("diff", task_bundle, task_bundle, "--json").stdout)
    t = manifest_of(task_bundle)["quality"]["task"]
    assert both["metrics"]["task_acc"]["a"] == both["metrics"]["task_acc"]["b"] == t["accuracy_after"]
    assert both["metrics"]["task_acc_delta"]["b"] == t["difference"]
    one = json.loads(dwc("diff", bundle, task_bundle, "--json").stdout)
    assert "task_acc" not in one["metrics"] and "ppl" in one["metrics"]
    text = dwc("diff", task_bundle, task_bundle).stdout
    assert "task_acc" in text


def test_the_cache_keys_on_the_task_file(task_bundle, example, tmp_path):
    """The same task re-uses the measurement, a new margin too; a changed task file does not."""
    again = dwc("build", task_buildfile(tmp_path / "a", example, example / "task.jsonl"),
                "-t", "cpu-bf16", "-o", tmp_path / "a" / "b", "--set", "evaluation.task.margin=0")
    assert again.exit_code == 0, again.stderr
    m = manifest_of(tmp_path / "a" / "b")
    assert next(p for p in m["passes"] if p["name"] == "evaluate")["cached"]
    assert m["quality"]["task"]["margin"] == 0.0
    assert m["quality"]["task"]["equivalent"] == (m["quality"]["task"]["ci"] == [0.0, 0.0])
    shorter = tmp_path / "short.jsonl"
    shorter.write_text("".join((example / "task.jsonl").read_text().splitlines(True)[:40]))
    changed = dwc("build", task_buildfile(tmp_path / "c", example, shorter),
                  "-t", "cpu-bf16", "-o", tmp_path / "c" / "b")
    assert changed.exit_code == 0, changed.stderr
    m = manifest_of(tmp_path / "c" / "b")
    assert not next(p for p in m["passes"] if p["name"] == "evaluate")["cached"]
    assert m["quality"]["task"]["n"] == 40


def test_required_and_not_equivalent_exits_3(example, tmp_path, monkeypatch):
    """The optimized model made to lose ten items it had right: exit 3, no bundle."""
    from dwc.quality import gate

    score = gate._score_task

    def worse_after(ctx, logits_fn, items, side):
        rows = score(ctx, logits_fn, items, side)
        if side == "after":
            right = [i for i, r in enumerate(rows) if r["correct"]][:10]
            for i in right:
                rows[i] = dict(rows[i], correct=False)
        return rows

    monkeypatch.setattr(gate, "_score_task", worse_after)
    task = tmp_path / "task.jsonl"
    shutil.copy(example / "task.jsonl", task)
    task.write_text(task.read_text() + '{"prompt": "import", "answer": "os"}\n')  # a new key
    out = tmp_path / "bundle"
    result = dwc("build", task_buildfile(tmp_path, example, task, required=True),
                 "-t", "cpu-bf16", "-o", out)
    line = assert_clean_error(result, 3, "quality budget exceeded: task task.jsonl",
                              "lost 10, gained 0", "is not inside +-0.05 (required)")
    assert "[evaluate]" in line and not out.exists()
