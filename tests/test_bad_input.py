"""Every listed bad input: one line, exit 2 (or 3), no traceback, nothing at the output path."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from dwc.passes.base import Pass, PassResult
from tests.conftest import assert_clean_error, copy_checkpoint, dwc, write_buildfile
from tests.test_lora import make_adapter
from tests.test_checkpoint import tiny_checkpoint


def build(build_file, out, *extra):
    return dwc("build", build_file, "--target", "cpu-bf16", "-o", out, *extra)


def run_bad(tmp_path, example, code=2, fragments=(), extra=(), **changes):
    out = tmp_path / "out"
    result = build(write_buildfile(tmp_path / "bf", example, **changes), out, *extra)
    line = assert_clean_error(result, code, *fragments)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    return line


def test_malformed_yaml(tmp_path):
    bf = tmp_path / "model.yaml"
    bf.write_text("name: x\ncalibration: {data: [\n")
    assert_clean_error(build(bf, tmp_path / "out"), 2, "model.yaml", "invalid YAML")


@pytest.mark.parametrize("changes, fragments", [
    ({"surprise": 1}, ["surprise: unknown key"]),
    ({"evaluation.samples": "ten"}, ["evaluation.samples: expected int"]),
    ({"model": "/no/such/model"}, ["model: /no/such/model", "not found"]),
    ({"calibration.data": "/no/such/calib.txt"}, ["calibration.data", "file not found"]),
    ({"evaluation.data": "/no/such/eval.txt"}, ["evaluation.data", "file not found"]),
])
def test_build_file_errors(example, tmp_path, changes, fragments):
    run_bad(tmp_path, example, 2, fragments, **changes)


def test_empty_calibration_and_evaluation_files(example, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    run_bad(tmp_path, example, 2, ["calibration.data", "holds no text"],
            **{"calibration.data": str(empty)})
    run_bad(tmp_path, example, 2, ["evaluation.data", "holds no text"],
            **{"evaluation.data": str(empty)})


def test_folder_without_config(example, tmp_path):
    model = copy_checkpoint(example, tmp_path / "ckpt")
    (model / "config.json").unlink()
    run_bad(tmp_path, example, 2, ["no config.json"], model=str(model))


def test_corrupt_header_and_truncated_safetensors(example, tmp_path):
    model = copy_checkpoint(example, tmp_path / "ckpt")
    weights = model / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(struct.pack("<Q", len(good) * 4) + good[8:])
    run_bad(tmp_path, example, 2, ["[load]", "corrupt safetensors header"], model=str(model))
    weights.write_bytes(good[: len(good) // 2])
    run_bad(tmp_path, example, 2, ["[load]", "truncated"], model=str(model))


def test_unsupported_architecture(example, tmp_path):
    model = copy_checkpoint(example, tmp_path / "ckpt")
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(model_type="falcon", architectures=["FalconForCausalLM"])
    (model / "config.json").write_text(json.dumps(cfg))
    run_bad(tmp_path, example, 2, ["unsupported architecture", "falcon"], model=str(model))


def test_adapter_for_another_base_model(example, tmp_path):
    other = tmp_path / "other"
    tiny_checkpoint(other, example, "llama")
    adapter = make_adapter(other, tmp_path / "adapter")
    run_bad(tmp_path, example, 2, ["[load]", "adapter for another base model"],
            adapter=str(adapter))


def test_unknown_target_lists_the_known_ones(example, tmp_path):
    bf = write_buildfile(tmp_path, example)
    result = dwc("build", bf, "--target", "tpu-int2", "-o", tmp_path / "out")
    assert_clean_error(result, 2, "unknown target 'tpu-int2'", "cpu-bf16")


def test_pass_options_and_order_are_checked_before_running(example, tmp_path):
    run_bad(tmp_path, example, 2, ["passes.evaluate.bogus: unknown key"],
            passes={"evaluate": {"bogus": 1}})
    run_bad(tmp_path, example, 2, ["pass 'evaluate' reads 'reference'", "earlier: none"],
            optimization=["evaluate", "load", "emit"])
    run_bad(tmp_path, example, 2, ["unknown pass 'prune'"],
            optimization=["load", "prune", "evaluate", "emit"])
    run_bad(tmp_path, example, 2, ["must include 'evaluate'"], optimization=["load", "emit"])


def test_existing_output_that_is_not_a_bundle(example, tmp_path):
    bf = write_buildfile(tmp_path / "bf", example)
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert_clean_error(build(bf, out), 2, "not a dwc bundle", "--force")
    assert (out / "notes.txt").read_text() == "keep me"
    assert build(bf, out, "--force").exit_code == 0
    assert not (out / "notes.txt").exists() and (out / "manifest.json").exists()


def test_output_that_holds_an_input_is_refused(example, tmp_path):
    model = copy_checkpoint(example, tmp_path / "ckpt")
    bf = write_buildfile(tmp_path / "bf", example, model=str(model))
    assert_clean_error(build(bf, tmp_path, "--force"), 2, "holds the build's input")
    assert (model / "config.json").exists()


class Perturb(Pass):
    """A test-only lossy pass: adds noise of half the weight std to every Linear."""

    name = "perturb"
    description = "test double"
    reads = ("model",)
    writes = ("model",)
    lossy = True

    def run(self, ctx, options) -> PassResult:
        import copy

        import torch

        model = copy.deepcopy(ctx.artifacts.model)
        gen = torch.Generator().manual_seed(0)
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight.data
                noise = torch.randn(w.shape, generator=gen).to(w.dtype)
                module.weight.data = w + 0.5 * w.std() * noise
        return PassResult(outputs={"model": model})


def test_quality_budget_exceeded_exits_3_names_the_pass_and_resumes(example, tmp_path,
                                                                    monkeypatch):
    from dwc.passes import REGISTRY

    monkeypatch.setitem(REGISTRY, "perturb", Perturb)
    pipeline = ["load", "perturb", "calibrate", "evaluate", "emit"]
    line = run_bad(tmp_path, example, 3, ["[evaluate]", "quality budget exceeded", "budget 1.0%",
                                          "passes that changed the model: load, perturb"],
                   optimization=pipeline)
    assert "over by" in line
    out = tmp_path / "ok"
    bf = write_buildfile(tmp_path / "bf2", example, optimization=pipeline)
    result = build(bf, out, "--json", "--set", "evaluation.max_ppl_increase_pct=1000")
    assert result.exit_code == 0, result.stdout
    m = json.loads(result.stdout)["manifest"]
    assert {p["name"]: p["cached"] for p in m["passes"]}["evaluate"] is True
    assert m["quality"]["delta_pct"] > 1.0 and m["quality"]["budget_pct"] == 1000
    report = json.loads((out / "reports" / "quality.json").read_text())
    assert report["budget_pct"] == 1000 and report["passed"] is True


def test_json_errors_are_machine_readable(example, tmp_path):
    bf = write_buildfile(tmp_path, example, surprise=1)
    result = dwc("build", bf, "-t", "cpu-bf16", "-o", tmp_path / "out", "--json")
    assert result.exit_code == 2
    err = json.loads(result.stdout)["error"]
    assert err["code"] == 2 and "surprise: unknown key" in err["message"] and err["pass"] is None


def test_not_a_bundle_for_inspect(tmp_path):
    assert_clean_error(dwc("inspect", tmp_path), 2, "not a dwc bundle")
    assert_clean_error(dwc("inspect", tmp_path / "nope"), 2, "not a folder")


def test_unsafe_manifest_paths_and_symlinks_are_refused(bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    secret = tmp_path / "secret.txt"
    secret.write_text("x")
    manifest["files"]["../secret.txt"] = {"sha256": "0" * 64, "bytes": 1}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert_clean_error(dwc("inspect", "--verify", copy), 2)
    assert "../secret.txt: path leaves the bundle" in dwc("inspect", "--verify", copy).stderr
    shutil.rmtree(copy)
    shutil.copytree(bundle, copy)
    (copy / "reports" / "quality.json").unlink()
    (copy / "reports" / "quality.json").symlink_to(secret)
    result = dwc("inspect", "--verify", copy)
    assert result.exit_code == 2 and "symlink" in result.stderr
