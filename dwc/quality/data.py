"""Calibration and evaluation text: reading the files and cutting token windows.

Formats (README.md, "The build file"): `.txt` (the whole file is one document) and
`.jsonl`, one JSON object per line, either {"text": ...} or chat {"messages": [{"role", "content"}, ...]}.
Chat records are rendered with the tokenizer's chat template when it has one.
"""

from __future__ import annotations

import json
from pathlib import Path

from dwc.errors import BadInput

SUFFIXES = (".txt", ".jsonl")


def read_records(path: Path) -> list:
    """The file's documents: strings, or lists of chat messages. Errors name the file."""
    if not path.exists():
        raise BadInput(f"{path}: file not found")
    if not path.is_file():
        raise BadInput(f"{path}: not a file")
    if path.suffix not in SUFFIXES:
        raise BadInput(f"{path}: unsupported data format {path.suffix!r} (use .txt or .jsonl)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    records = _jsonl_records(path, text) if path.suffix == ".jsonl" else [text]
    records = [r for r in records if (r.strip() if isinstance(r, str) else r)]
    if not records:
        raise BadInput(f"{path}: the file holds no text")
    return records


def _jsonl_records(path: Path, text: str) -> list:
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if isinstance(obj, dict) and isinstance(obj.get("text"), str):
            records.append(obj["text"])
        elif isinstance(obj, dict) and _is_chat(obj.get("messages")):
            records.append(obj["messages"])
        else:
            raise BadInput(f'{path}:{lineno}: expected {{"text": ...}} or {{"messages": '
                           f'[{{"role": ..., "content": ...}}]}}')
    return records


def _is_chat(messages) -> bool:
    return isinstance(messages, list) and bool(messages) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str) for m in messages)


def render(record, tokenizer) -> str:
    """A record as plain text; chats go through the tokenizer's own template. Without one
    a chat cannot be rendered as the model will be prompted (transformers refuses too),
    so it is an input error, not a silently invented format."""
    if isinstance(record, str):
        return record
    if not getattr(tokenizer, "chat_template", None):
        raise BadInput("chat records (\"messages\") need the model's tokenizer to have a "
                       "chat template, and it has none")
    return tokenizer.apply_chat_template(record, tokenize=False)


def has_chat_template(model_dir: Path) -> bool:
    """Whether a checkpoint folder's tokenizer has a chat template, from its files (the
    build file is checked before anything loads the tokenizer)."""
    if (model_dir / "chat_template.jinja").is_file() or (model_dir / "chat_template.json").is_file():
        return True
    try:
        config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(isinstance(config, dict) and config.get("chat_template"))


def token_windows(path: Path, tokenizer, samples: int, seq_len: int):
    """Up to `samples` windows of `seq_len` token ids, as a list of 1-D LongTensors.

    Documents are joined with the EOS token and cut into consecutive, non-overlapping
    windows, so every token is used once; a corpus shorter than one window gives one
    shorter window. Deterministic: no shuffling, the file's order decides.
    """
    import torch

    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    need = samples * seq_len
    for record in read_records(path):
        ids.extend(tokenizer(render(record, tokenizer), add_special_tokens=False)["input_ids"])
        ids.extend(eos)
        if len(ids) >= need:
            break
    ids = ids[:need]
    if len(ids) < 2:
        raise BadInput(f"{path}: too little text (fewer than 2 tokens)")
    flat = torch.tensor(ids, dtype=torch.long)
    return [flat[i:i + seq_len] for i in range(0, len(flat), seq_len) if len(flat[i:i + seq_len]) > 1]


def batches(windows, size: int):
    """Groups of at most `size` windows of equal length, in order (stackable as one tensor)."""
    for i in range(0, len(windows), size):
        chunk = windows[i:i + size]
        for n in sorted({len(w) for w in chunk}, reverse=True):
            yield [w for w in chunk if len(w) == n]
