"""Folders a bundle carries beside its backend's model/: the draft model (draft/, any
backend whose target distills one; Hugging Face layout, or an EAGLE head's own files)
and tokenizer files copied verbatim."""

from __future__ import annotations

from pathlib import Path

from dwc.bundle.writer import BundleWriter
from dwc.formats import hf
from dwc.formats import manifest as mf


def copy_tokenizer(writer: BundleWriter, source_dir: Path, dest: str) -> None:
    """Tokenizer files verbatim from the source checkpoint (byte-identical, not re-saved)."""
    for name in hf.TOKENIZER_FILES:
        if (Path(source_dir) / name).is_file():
            writer.copy_file(f"{dest}/{name}", Path(source_dir) / name)


def write_draft(writer: BundleWriter, draft, source_dir: Path) -> None:
    """draft/: the distilled draft in Hugging Face layout (bf16) with the shared tokenizer,
    or an EAGLE head: its own weights (bf16) and config, nothing of the target's."""
    import torch

    from dwc.model.eagle_head import EagleHead

    if isinstance(draft, EagleHead):
        draft.save(writer.path(f"{mf.DRAFT_DIR}/{mf.EAGLE_CONFIG}").parent)
        return
    out = writer.path(f"{mf.DRAFT_DIR}/{hf.CONFIG}").parent
    draft.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    copy_tokenizer(writer, source_dir, mf.DRAFT_DIR)
