"""`load`: read the Hugging Face checkpoint (safetensors only), merge the LoRA adapter.

Writes `reference` (the source model as stored, adapter merged: what quality is measured
against), `model` (the working copy in the target's dtype, which later passes transform),
`tokenizer`, and `source` (paths and sha256 of every input file, for the manifest).
"""

from __future__ import annotations

import copy
from pathlib import Path

from dwc.model.checkpoint import check_size_against_weights, safetensors_header, stored_dtype, weight_files
from dwc.formats import hf
from dwc.bundle.hashing import sha256_file
from dwc.model.loading import adapter_config, adapter_files, load_model, load_tokenizer, merge_adapter
from dwc.passes.base import Pass, PassResult


class Load(Pass):
    name = "load"
    description = ("Read a Hugging Face checkpoint (safetensors only, no remote code) and "
                   "merge a PEFT LoRA adapter; cast a working copy to the target's dtype.")
    writes = ("reference", "model", "tokenizer", "source")
    lossy = True  # the cast to the target dtype can round weights

    def key_material(self, ctx, options):
        return {"inputs": _input_hashes(ctx), "dtype": ctx.target.weights.dtype}

    def run(self, ctx, options) -> PassResult:
        info = ctx.info
        files = weight_files(info.path)
        headers = [safetensors_header(f) for f in files]
        check_size_against_weights(info, headers)
        dtype = stored_dtype(headers)
        reference = load_model(info, dtype, ctx.compute_device)
        adapter = None
        if ctx.build.adapter is not None:
            reference = merge_adapter(reference, ctx.build.adapter, dtype)
            cfg = adapter_config(ctx.build.adapter)
            adapter = {"path": str(ctx.build.adapter), "rank": cfg.get("r"),
                       "alpha": cfg.get("lora_alpha"),
                       "target_modules": sorted(cfg.get("target_modules") or []),
                       "files": _hashes(adapter_files(ctx.build.adapter), ctx.build.adapter)}
        model = _as_dtype(reference, ctx.target.weights.dtype)
        source = {
            "model": {"path": str(info.path), "files": _input_hashes(ctx)["model"]},
            "architecture": info.architecture, "config": info.as_dict(), "stored_dtype": dtype,
            "parameters": sum(p.numel() for p in reference.parameters()),
            "adapter": adapter,
        }
        metrics = {"parameters": source["parameters"], "stored_dtype": dtype,
                   "weight_files": len(files), "adapter_merged": adapter is not None}
        return PassResult(outputs={"reference": reference, "model": model,
                                   "tokenizer": load_tokenizer(info.path), "source": source},
                          metrics=metrics)


def _as_dtype(reference, dtype: str):
    """A copy of `reference` in `dtype` (the reference itself when the dtype already matches)."""
    import torch

    if next(reference.parameters()).dtype == getattr(torch, dtype):
        return reference  # artifacts are never changed in place, so sharing is safe
    return copy.deepcopy(reference).to(getattr(torch, dtype))


def _input_hashes(ctx) -> dict:
    """sha256 of the files that make up the checkpoint and the adapter."""
    model_dir = ctx.info.path
    files = [model_dir / hf.CONFIG, *weight_files(model_dir)]
    files += [model_dir / n for n in (hf.SAFETENSORS_INDEX, hf.GENERATION_CONFIG, *hf.TOKENIZER_FILES)
              if (model_dir / n).is_file()]
    out = {"model": _hashes(files, model_dir)}
    if ctx.build.adapter is not None:
        out["adapter"] = _hashes(adapter_files(ctx.build.adapter), ctx.build.adapter)
    return out


def _hashes(files: list[Path], root: Path) -> dict:
    return {str(Path(f).relative_to(root)): sha256_file(f) for f in sorted(set(files))}
