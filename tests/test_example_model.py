"""The embedded example model: HF layout, disjoint splits, and it learned something."""

from __future__ import annotations

import json
import math

import torch


def test_loads_with_plain_transformers_and_learned(example):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(example / "checkpoint")
    tok = AutoTokenizer.from_pretrained(example / "checkpoint")
    assert model.config.model_type == "llama" and model.config.num_key_value_heads == 2
    text = (example / "eval.txt").read_text()[:20000]
    ids = torch.tensor(tok(text)["input_ids"][:8 * 256]).reshape(8, 256)
    with torch.no_grad():
        ppl = math.exp(model(ids, labels=ids).loss.item())
    # Uniform guessing over the vocabulary would be 4096; a trained model is far below.
    assert ppl < len(tok) / 10, ppl
    report = json.loads((example / "dwc-example.json").read_text())
    assert report["heldout_ppl"] < len(tok) / 10


def test_splits_are_disjoint_files(example):
    report = json.loads((example / "dwc-example.json").read_text())
    splits = {k: set(v) for k, v in report["split_files"].items()}
    assert splits["calib"] and splits["eval"] and splits["train"]
    assert not splits["calib"] & splits["eval"]
    assert not splits["train"] & (splits["calib"] | splits["eval"])
    calib, evaluation = (example / "calib.txt").read_text(), (example / "eval.txt").read_text()
    assert calib and evaluation and calib != evaluation
