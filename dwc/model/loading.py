"""Turning a checked checkpoint into a torch model and tokenizer, and merging LoRA adapters."""

from __future__ import annotations

import json
from pathlib import Path

from dwc.model.checkpoint import ModelInfo, safetensors_header
from dwc.errors import CheckpointError
from dwc.formats import hf


def load_model(info: ModelInfo, dtype: str, device: str = "cpu"):
    """The model in `dtype` on `device`, every weight present, finite and of the config's shape."""
    import torch
    import transformers

    from huggingface_hub.errors import StrictDataclassError

    cls = getattr(transformers, info.architecture)
    try:
        model, loading = cls.from_pretrained(
            info.path, dtype=getattr(torch, dtype), device_map=device, use_safetensors=True,
            trust_remote_code=False, local_files_only=True, output_loading_info=True)
    except StrictDataclassError as e:  # transformers' own config validation
        raise CheckpointError(f"{info.path}/{hf.CONFIG}: transformers refuses the config "
                              f"({_first_line(e)})") from None
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{info.path}: cannot load weights ({_first_line(e)})") from None
    missing = [k for k in loading.get("missing_keys", []) if not _tied_head(k, info)]
    bad = missing or loading.get("mismatched_keys") or loading.get("unexpected_keys")
    if bad:
        kind = ("missing" if missing else "mismatched" if loading.get("mismatched_keys")
                else "unexpected")
        raise CheckpointError(f"{info.path}: {kind} weights for the config "
                              f"({_preview(list(bad))})")
    check_finite(model, info.path)
    model.eval()
    model.requires_grad_(False)
    return model


def _tied_head(key: str, info: ModelInfo) -> bool:
    return info.tie_word_embeddings and key == "lm_head.weight"


def check_finite(model, where: Path) -> None:
    import torch

    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise CheckpointError(f"{where}: weight {name} holds NaN or infinite values")


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    if not any((Path(model_dir) / f).is_file() for f in hf.TOKENIZER_FILES):
        raise CheckpointError(f"{model_dir}: no tokenizer files (expected tokenizer.json)")
    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False,
                                             local_files_only=True)
    except (OSError, ValueError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{model_dir}: cannot load the tokenizer ({_first_line(e)})") from None


def adapter_files(adapter_dir: Path) -> list[Path]:
    adapter_dir = Path(adapter_dir)
    cfg, weights = adapter_dir / hf.ADAPTER_CONFIG, adapter_dir / hf.ADAPTER_WEIGHTS
    if not adapter_dir.is_dir():
        raise CheckpointError(f"{adapter_dir}: adapter folder not found")
    if not cfg.is_file():
        raise CheckpointError(f"{adapter_dir}: no {hf.ADAPTER_CONFIG} (not a PEFT adapter)")
    if not weights.is_file():
        raise CheckpointError(f"{adapter_dir}: no {hf.ADAPTER_WEIGHTS} (pickle adapters "
                              "are refused)")
    return [cfg, weights]


def adapter_config(adapter_dir: Path) -> dict:
    path = Path(adapter_dir) / hf.ADAPTER_CONFIG
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: only LoRA adapters are supported "
                              f"(peft_type={cfg.get('peft_type') if isinstance(cfg, dict) else None!r})")
    return cfg


def merge_adapter(model, adapter_dir: Path, dtype: str):
    """Merge a LoRA adapter: W' = W + scale * B @ A, computed in float32, then cast back."""
    import torch
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    adapter_config(adapter_dir)
    _check_adapter_shapes(model, adapter_dir)
    model = model.float()
    try:
        peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
        merged = peft_model.merge_and_unload()
    except (ValueError, RuntimeError, KeyError, OSError) as e:
        raise CheckpointError(f"{adapter_dir}: adapter does not fit the model "
                              f"({_first_line(e)})") from None
    merged = merged.to(getattr(torch, dtype))
    check_finite(merged, adapter_dir)
    merged.eval()
    merged.requires_grad_(False)
    return merged


def _check_adapter_shapes(model, adapter_dir: Path) -> None:
    """Every lora_A / lora_B must sit on a Linear of the base model, with matching sizes.

    peft reports a size mismatch as a long multi-line RuntimeError, or only a warning when
    names do not match at all; this says which layer does not fit, in one line.
    """
    path = adapter_dir / hf.ADAPTER_WEIGHTS
    header = safetensors_header(path)
    modules = dict(model.named_modules())
    for key, t in header.items():
        if key == "__metadata__" or ".lora_" not in key:
            continue
        module_name, _, rest = key.partition(".lora_")
        module_name = module_name.removeprefix("base_model.model.")
        layer = modules.get(module_name)
        if layer is None or not hasattr(layer, "in_features"):
            raise CheckpointError(f"{path}: {key} targets {module_name}, which the base "
                                  "model does not have (adapter for another model?)")
        shape = t["shape"]
        if rest.startswith("A.") and shape[1:] != [layer.in_features]:
            bad = f"lora_A {shape} needs {layer.in_features} input features"
        elif rest.startswith("B.") and shape[:1] != [layer.out_features]:
            bad = f"lora_B {shape} needs {layer.out_features} output features"
        else:
            continue
        raise CheckpointError(f"{path}: adapter for another base model: {module_name} "
                              f"{bad}")


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def _preview(names: list[str], n: int = 3) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(str(x) for x in names[:n]) + more
