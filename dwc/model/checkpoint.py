"""Reading Hugging Face checkpoints safely: config, safetensors headers, weights, tokenizer.

Only safetensors are read (pickle runs code on load); remote code is never trusted. Every
problem becomes a CheckpointError naming the file, before transformers sees it where we
can: transformers' own errors are long and sometimes arrive as warnings with the weights
silently left random.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from dwc.errors import CheckpointError
from dwc.formats import hf

# safetensors dtype -> torch dtype name, for the floating types a checkpoint stores.
FLOAT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class ModelInfo:
    """The shape facts of a checkpoint that targets and passes decide on."""

    path: Path
    model_type: str
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    config: dict

    def as_dict(self) -> dict:
        keys = ("model_type", "architecture", "hidden_size", "num_layers", "num_heads",
                "num_kv_heads", "head_dim", "intermediate_size", "vocab_size",
                "tie_word_embeddings")
        return {k: getattr(self, k) for k in keys}


def read_config(model_dir: Path) -> dict:
    cfg_path = Path(model_dir) / hf.CONFIG
    if not Path(model_dir).is_dir():
        raise CheckpointError(f"{model_dir}: model folder not found")
    if not cfg_path.is_file():
        raise CheckpointError(f"{model_dir}: no {hf.CONFIG} (not a Hugging Face checkpoint)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object")
    return cfg


def model_info(model_dir: Path) -> ModelInfo:
    """Read config.json and refuse what dwc cannot compile, naming the field."""
    cfg = read_config(model_dir)
    where = Path(model_dir) / hf.CONFIG
    model_type = cfg.get("model_type")
    if model_type not in hf.ARCHITECTURES:
        raise CheckpointError(f"{where}: unsupported architecture model_type={model_type!r} "
                              f"(supported: {', '.join(hf.ARCHITECTURES)})")
    archs = cfg.get("architectures") or [hf.ARCHITECTURES[model_type]]
    if archs[0] != hf.ARCHITECTURES[model_type]:
        raise CheckpointError(f"{where}: unsupported architectures={archs} "
                              f"(expected {hf.ARCHITECTURES[model_type]})")

    def need(key):
        value = cfg.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise CheckpointError(f"{where}: {key} must be a positive integer, got {value!r}")
        return value

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    if heads % kv_heads:
        raise CheckpointError(f"{where}: num_attention_heads {heads} is not a multiple of "
                              f"num_key_value_heads {kv_heads}")
    return ModelInfo(
        path=Path(model_dir), model_type=model_type, architecture=archs[0],
        hidden_size=hidden, num_layers=need("num_hidden_layers"), num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim,
        intermediate_size=need("intermediate_size"), vocab_size=need("vocab_size"),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), config=cfg)


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files (one, or every shard its index names)."""
    model_dir = Path(model_dir)
    index = model_dir / hf.SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: invalid safetensors index ({e})") from None
        for name in names:
            if Path(name).name != name or not (model_dir / name).is_file():
                raise CheckpointError(f"{index}: names shard {name!r}, which is missing")
        return [model_dir / n for n in names]
    single = model_dir / hf.SAFETENSORS
    if single.is_file():
        return [single]
    found = sorted(model_dir.glob("*.safetensors"))
    if len(found) == 1:
        return found
    if any(p.suffix in hf.PICKLE_SUFFIXES for p in model_dir.iterdir()):
        raise CheckpointError(f"{model_dir}: only pickle weights found; dwc reads safetensors "
                              "only (convert the checkpoint with safetensors first)")
    raise CheckpointError(f"{model_dir}: no {hf.SAFETENSORS} or {hf.SAFETENSORS_INDEX}")


def safetensors_header(path: Path) -> dict:
    """Parse and check a safetensors header: every tensor's bytes lie inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: corrupt safetensors (file shorter than its header)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(MAX_HEADER, size - 8):
            raise CheckpointError(f"{path}: corrupt safetensors header (claims {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_size = size - 8 - n
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        _check_tensor_entry(path, name, t, data_size)
        end = max(end, t["data_offsets"][1])
    if end != data_size:
        raise CheckpointError(f"{path}: truncated or padded safetensors (header describes "
                              f"{end} bytes of tensor data, file holds {data_size})")
    return header


def _check_tensor_entry(path: Path, name: str, t, data_size: int) -> None:
    ok = (isinstance(t, dict) and t.get("dtype") in hf.SAFETENSORS_DTYPES
          and isinstance(t.get("shape"), list) and isinstance(t.get("data_offsets"), list)
          and len(t["data_offsets"]) == 2
          and all(isinstance(d, int) and d >= 0 for d in t["shape"] + t["data_offsets"]))
    if not ok:
        raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}")
    begin, end = t["data_offsets"]
    count = 1
    for d in t["shape"]:
        count *= d
    if end < begin or end - begin != count * hf.SAFETENSORS_DTYPES[t["dtype"]]:
        raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape "
                              f"{t['shape']} {t['dtype']}")
    if end > data_size:
        raise CheckpointError(f"{path}: truncated safetensors (tensor {name!r} ends at byte "
                              f"{end}, the data holds {data_size})")


def stored_dtype(headers: list[dict]) -> str:
    """The floating dtype most of the checkpoint's parameters are stored in."""
    counts: dict[str, int] = {}
    for header in headers:
        for name, t in header.items():
            if name != "__metadata__" and t["dtype"] in FLOAT_DTYPES:
                counts[t["dtype"]] = counts.get(t["dtype"], 0) + 1
    if not counts:
        raise CheckpointError("checkpoint holds no floating-point weights")
    return FLOAT_DTYPES[max(sorted(counts), key=counts.get)]


def expected_parameters(info: ModelInfo) -> int:
    """Parameters the config describes (decoder Linears, embeddings, norms; biases left
    out: they are a rounding error of the total)."""
    h, layers = info.hidden_size, info.num_layers
    q, kv = info.num_heads * info.head_dim, info.num_kv_heads * info.head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * info.intermediate_size + 2 * h
    embeddings = info.vocab_size * h * (1 if info.tie_word_embeddings else 2)
    return embeddings + layers * per_layer + h


def check_size_against_weights(info: ModelInfo, headers: list[dict]) -> None:
    """Refuse a config that describes a much larger model than the weight files hold,
    before transformers allocates it (a vocab_size of 10^9 would take all memory)."""
    stored = 0
    for header in headers:
        for name, t in header.items():
            if name != "__metadata__":
                count = 1
                for d in t["shape"]:
                    count *= d
                stored += count
    described = expected_parameters(info)
    if described > stored * 1.05:
        raise CheckpointError(f"{info.path / hf.CONFIG}: describes {described:,} parameters but "
                              f"the weight files hold {stored:,}")
