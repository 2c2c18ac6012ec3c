"""Calibrated quantization through llm-compressor, written in the compressed-tensors layout.

dwc does not re-implement AWQ, GPTQ or SmoothQuant: it builds llm-compressor recipes for
the target's scheme, runs `oneshot` on the calibration windows, and saves the result with
`save_compressed=True`, which vLLM, SGLang and transformers (with compressed-tensors
installed) load as it is.

Schemes (README.md, "Targets"):
- fp8-w8a8: FP8 E4M3 weights with one scale per output channel, activations with one
  static scale per tensor from the calibration set.
- int8-w8a8: INT8 weights per output channel, activations per token (dynamic) or per
  tensor (static), after SmoothQuant moves activation outliers into the weights.
- int4-w4a16: INT4 weights in groups of 128 with scale and zero point (asymmetric, the
  layout AWQ produces), activations in bf16. AWQ, GPTQ or round-to-nearest.
`lm_head` is never quantized.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from dwc.errors import BadInput

SCHEMES = ("fp8-w8a8", "int8-w8a8", "int4-w4a16")
METHODS = {"fp8-w8a8": ("rtn", "gptq"), "int8-w8a8": ("rtn", "gptq"),
           "int4-w4a16": ("awq", "gptq", "rtn")}
ALWAYS_IGNORED = ("lm_head",)


def quant_scheme(scheme: str, group_size: int, int8_activations: str):
    """The compressed-tensors QuantizationScheme for one of dwc's schemes."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    if scheme == "fp8-w8a8":
        weights = QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True)
        acts = QuantizationArgs(num_bits=8, type="float", strategy="tensor", symmetric=True,
                                dynamic=False, observer="static_minmax")
    elif scheme == "int8-w8a8":
        weights = QuantizationArgs(num_bits=8, type="int", strategy="channel", symmetric=True)
        static = int8_activations == "static"
        acts = QuantizationArgs(num_bits=8, type="int", symmetric=True, dynamic=not static,
                                strategy="tensor" if static else "token",
                                observer="static_minmax" if static else None)
    elif scheme == "int4-w4a16":
        weights = QuantizationArgs(num_bits=4, type="int", strategy="group",
                                   group_size=group_size, symmetric=False)
        acts = None
    else:
        raise BadInput(f"unknown quantization scheme {scheme!r} (known: {', '.join(SCHEMES)})")
    return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)


def recipe(scheme: str, method: str, ignore: list[str], group_size: int = 128,
           smoothing_strength: float = 0.8, int8_activations: str = "dynamic") -> list:
    """llm-compressor modifiers, in the order they run."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    if method not in METHODS[scheme]:
        raise BadInput(f"quantize.method: {method!r} does not apply to {scheme} "
                       f"(use {', '.join(METHODS[scheme])})")
    groups = {"group_0": quant_scheme(scheme, group_size, int8_activations)}
    ignore = sorted(set(ALWAYS_IGNORED) | set(ignore))
    modifiers = []
    if scheme == "int8-w8a8" and smoothing_strength > 0:
        modifiers.append(SmoothQuantModifier(smoothing_strength=smoothing_strength))
    if method == "awq":
        modifiers.append(AWQModifier(duo_scaling="both"))
    if method == "gptq":
        modifiers.append(GPTQModifier(config_groups=groups, ignore=ignore))
    else:
        modifiers.append(QuantizationModifier(config_groups=groups, ignore=ignore))
    return modifiers


@contextlib.contextmanager
def cpu_pinning_disabled():
    """llm-compressor 0.14's AWQ pins its cached activations in page-locked memory before
    each grid search (`IntermediatesCache.pin_memory`), unconditionally; with no GPU,
    torch refuses ("Cannot access accelerator device when none is available"). Pinning
    only speeds host-to-GPU copies, so without an accelerator it is skipped, for the
    duration of one quantization, and restored after.
    """
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


def run_oneshot(model, windows, modifiers) -> None:
    """Calibrate and quantize `model` in place on the windows (a list of 1-D id tensors)."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from loguru import logger

    logger.disable("llmcompressor")  # its INFO lines would drown dwc's progress
    ds = Dataset.from_dict({"input_ids": [w.tolist() for w in windows],
                            "attention_mask": [[1] * len(w) for w in windows]})
    with cpu_pinning_disabled():
        oneshot(model=model, dataset=ds, recipe=modifiers, num_calibration_samples=len(windows),
                max_seq_length=max(len(w) for w in windows), shuffle_calibration_samples=False)


def save_compressed(model, folder: Path) -> None:
    """compressed-tensors safetensors + config.json (+ llm-compressor's recipe.yaml)."""
    model.save_pretrained(folder, save_compressed=True)


def load_compressed(folder: Path, device: str):
    """The quantized model as transformers loads it from the compressed files (weights
    decompressed, compressed-tensors' quantized forward kept): the very model a user of
    the bundle gets, so quality is measured on it."""
    import torch

    from dwc.runtime.model_runner import load_hf_model

    return load_hf_model(folder, device, torch.bfloat16)
