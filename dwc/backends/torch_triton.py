"""The torch-triton backend's model/: a Hugging Face checkpoint (config.json, safetensors,
tokenizer), loadable as it is by transformers and vLLM, and by dwc's runtime. Quantized
models are in the compressed-tensors layout (with llm-compressor's recipe.yaml).
"""

from __future__ import annotations

from pathlib import Path

from dwc.bundle.writer import BundleWriter
from dwc.constants import MAX_SHARD_SIZE
from dwc.formats import hf
from dwc.formats import manifest as mf


def emit(writer: BundleWriter, ctx) -> None:
    """model/: the quantize pass's compressed-tensors files as they are, or the bf16 model."""
    model, source_dir = ctx.artifacts["model"], ctx.info.path
    quantized = ctx.artifacts.get("quantized")
    if quantized is not None:
        for f in sorted(quantized.folder.iterdir()):
            if f.is_file() and f.name not in hf.TOKENIZER_FILES:
                writer.copy_file(f"{mf.MODEL_DIR}/{f.name}", f)
    else:
        out = writer.path(f"{mf.MODEL_DIR}/{hf.CONFIG}").parent
        model.save_pretrained(out, safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
    copy_tokenizer(writer, source_dir, mf.MODEL_DIR)


def copy_tokenizer(writer: BundleWriter, source_dir: Path, dest: str) -> None:
    """Tokenizer files verbatim from the source checkpoint (byte-identical, not re-saved)."""
    for name in hf.TOKENIZER_FILES:
        if (Path(source_dir) / name).is_file():
            writer.copy_file(f"{dest}/{name}", Path(source_dir) / name)


def write_draft(writer: BundleWriter, draft, source_dir: Path) -> None:
    """draft/: the distilled draft in Hugging Face layout (bf16) with the shared tokenizer."""
    import torch

    out = writer.path(f"{mf.DRAFT_DIR}/{hf.CONFIG}").parent
    draft.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    copy_tokenizer(writer, source_dir, mf.DRAFT_DIR)
