"""What passes hand each other: one typed field per artifact (docs/ARCHITECTURE.md).

A pass names the fields it reads and writes (`Pass.reads` / `writes`); the pipeline
checks the order before running anything and sets a field from each pass's outputs. A
name that is not a field here is refused when the passes are registered
(tests/test_pipeline.py), so a typo cannot become a second, silent artifact.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


class OnDisk(Protocol):
    """A quantized model written by a pass (llm-compressor, GGUF or ModelOpt): its
    folder, what it is (the manifest's `quantization`) and a one-line description."""

    folder: Path
    summary: dict

    def describe(self) -> str: ...


@dataclass
class ActivationStats:
    """Per-Linear input statistics over `tokens` calibration tokens (`calibrate`)."""

    mean_sq: dict  # layer name -> [in_features] float32, mean of x^2 per channel
    absmax: dict   # layer name -> [in_features] float32, max |x| per channel
    tokens: int
    out_absmax: dict = None  # k_proj / v_proj name -> [] max |output|, for FP8 KV scales


@dataclass
class Artifacts:
    reference: torch.nn.Module | None = None   # the checkpoint as stored (adapter merged)
    model: torch.nn.Module | None = None       # the optimized model so far
    tokenizer: PreTrainedTokenizerBase | None = None
    source: dict | None = None                 # the manifest's `source`
    calibration: ActivationStats | None = None
    quantized: OnDisk | None = None
    fusion: dict | None = None                 # plan, kernel table, check
    draft: dict | None = None                  # the draft's measured K, tau, cost ratio
    draft_model: Any = None                    # the distilled draft (a transformers model)
    kv_plan: dict | None = None                # the manifest's `kv_cache`
    tuning: dict | None = None                 # `tune`'s decision
    quality: dict | None = None                # the manifest's `quality`
    bundle: Path | None = None                 # where `emit` wrote the bundle


ARTIFACTS = tuple(f.name for f in fields(Artifacts))
