"""The engine's proposer for speculative decoding, as the bundle chose: n-gram lookup,
an EAGLE head or a draft model (docs/SPECULATION.md, "Serving")."""

from __future__ import annotations

from pathlib import Path

from dwc.model.eagle_head import eagle_taps, is_eagle
from dwc.runtime.eagle import EagleProposer
from dwc.runtime.model_runner import ModelRunner, load_hf_model
from dwc.runtime.ngram import NgramProposer
from dwc.runtime.speculative import Drafter


def draft_taps(draft_dir: Path | None) -> tuple[int, ...]:
    """The target layers an EAGLE head in `draft_dir` reads (none for another draft):
    the target's runner keeps them in every step, its CUDA graphs included."""
    return eagle_taps(draft_dir) if is_eagle(draft_dir) else ()


def make_proposer(k: int, ngram: bool, draft_dir: Path | None, target: ModelRunner,
                  num_blocks: int, block_size: int, device: str, dtype, graph: int,
                  fusion: dict | None):
    """None without speculation; `graph`: the decode graphs' tokens for a draft model."""
    if ngram and k:
        return NgramProposer(k)
    if draft_dir is None:
        return None
    if is_eagle(draft_dir):
        return EagleProposer.load(draft_dir, target, num_blocks, block_size, k)
    return Drafter(ModelRunner(load_hf_model(draft_dir, device, dtype), num_blocks, block_size,
                               device, graph_tokens=graph, fusion=fusion), k)
