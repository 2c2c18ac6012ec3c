"""Evaluation tasks: reading a task file and scoring its items with a model (docs/QUALITY.md).

A task is a `.jsonl` file, one item a line:

- multiple choice: {"prompt": ..., "choices": [..., ...], "answer": <index of the right
  choice>}. Each choice is scored by its log-likelihood given the prompt (the sum over its
  tokens, as lm-evaluation-harness scores `acc`); the model picks the highest.
- exact match: {"prompt": ..., "answer": "..."}. The model continues the prompt greedily;
  the first line of the continuation that has text, stripped, must equal the answer,
  stripped.

An optional "id" labels an item in reports. Models are ids [b, s] -> logits [b, s, vocab]
functions (dwc.quality.metrics.hf_logits, `Backend.eval_logits`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from dwc.errors import BadInput

KEYS = ("id", "prompt", "choices", "answer")


@dataclass
class TaskItem:
    where: str  # "file:line", for errors and reports
    prompt: str
    answer: Union[int, str]
    choices: Optional[list[str]] = None
    id: Optional[str] = None


def read_task(path: Path) -> list[TaskItem]:
    """The task file's items; each error is one line naming the file, the line and the key."""
    if not path.is_file():
        raise BadInput(f"{path}: {'not a file' if path.exists() else 'file not found'}")
    if path.suffix != ".jsonl":
        raise BadInput(f"{path}: a task is a .jsonl file (one item a line), not {path.suffix!r}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    items = []
    for line, raw in enumerate(text.splitlines(), 1):
        if raw.strip():
            items.append(_item(f"{path}:{line}", raw))
    if not items:
        raise BadInput(f"{path}: the task holds no items")
    return items


def _item(where: str, raw: str) -> TaskItem:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise BadInput(f"{where}: invalid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise BadInput(f'{where}: expected an object {{"prompt": ..., "answer": ...}}')
    unknown = sorted(set(obj) - set(KEYS))
    if unknown:
        raise BadInput(f'{where}: "{unknown[0]}": unknown key (known: {", ".join(KEYS)})')
    prompt, answer, choices = obj.get("prompt"), obj.get("answer"), obj.get("choices")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadInput(f'{where}: "prompt": expected a non-empty string')
    if "id" in obj and not isinstance(obj["id"], (str, int)):
        raise BadInput(f'{where}: "id": expected a string or an integer')
    label = str(obj["id"]) if "id" in obj else None
    if choices is None:
        if not isinstance(answer, str) or not answer.strip():
            raise BadInput(f'{where}: "answer": expected a non-empty string (exact match) '
                           'or "choices" with the index of the right one')
        return TaskItem(where, prompt, answer, None, label)
    if not (isinstance(choices, list) and len(choices) >= 2
            and all(isinstance(c, str) and c for c in choices)):
        raise BadInput(f'{where}: "choices": expected a list of at least 2 non-empty strings')
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise BadInput(f'{where}: "answer": expected the index of the right choice, '
                       f'0 to {len(choices) - 1}')
    return TaskItem(where, prompt, answer, list(choices), label)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids as lm-evaluation-harness cuts them: the context's
    trailing whitespace moves to the continuation, the pair is encoded whole and the
    continuation is what follows the context's own tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    cont = whole[len(ctx):] or _encode(tokenizer, continuation)
    return ctx, cont


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _pad_id(tokenizer) -> int:
    """Right padding: a causal model's logits before a position never see it, so any id."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def choose(item: TaskItem, tokenizer, logits_fn, seq_len: int) -> int:
    """The index of the choice with the highest log-likelihood (the first on a tie). All
    choices run as one batch, right-padded; a prompt too long for `seq_len` tokens keeps
    its end."""
    import torch

    rows, spans = [], []
    for choice in item.choices:
        ctx, cont = encode_pair(tokenizer, item.prompt, choice)
        if len(cont) >= seq_len:
            raise BadInput(f"{item.where}: a choice is {len(cont)} tokens, more than the "
                           f"evaluation window (evaluation.seq_len {seq_len}) holds")
        row = (ctx + cont)[-seq_len:]
        rows.append(row)
        spans.append((len(row) - len(cont), len(row)))
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [_pad_id(tokenizer)] * (width - len(r)) for r in rows])
    with torch.inference_mode():
        logprobs = torch.log_softmax(logits_fn(ids).float().cpu(), -1)
    scores = [logprobs[i, start - 1:end - 1].gather(-1, ids[i, start:end, None]).sum().item()
              for i, (start, end) in enumerate(spans)]
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def continue_greedily(item: TaskItem, tokenizer, logits_fn, seq_len: int,
                      max_new_tokens: int) -> str:
    """The first line with text of the greedy continuation (at most `max_new_tokens`
    tokens, up to the end-of-sequence token). The row keeps one width while it grows
    (right-padded), so the backend sees one shape."""
    import torch

    prompt = _encode(tokenizer, item.prompt)[-max(1, seq_len - max_new_tokens):]
    width = min(seq_len, len(prompt) + max_new_tokens)
    row, new = list(prompt), []
    while len(new) < max_new_tokens and len(row) < width:
        ids = torch.tensor([row + [_pad_id(tokenizer)] * (width - len(row))])
        with torch.inference_mode():
            token = int(logits_fn(ids)[0, len(row) - 1].float().argmax())
        if token == tokenizer.eos_token_id:
            break
        row.append(token)
        new.append(token)
        text = tokenizer.decode(new).lstrip()
        if "\n" in text:
            break
    return tokenizer.decode(new).lstrip().split("\n", 1)[0].strip()


def score(items: list[TaskItem], tokenizer, logits_fn, seq_len: int, max_new_tokens: int,
          advance=lambda n: None) -> list[dict]:
    """Each item's prediction (a choice's index, or the continuation) and whether it is right."""
    out = []
    for item in items:
        if item.choices is not None:
            prediction = choose(item, tokenizer, logits_fn, seq_len)
            correct = prediction == item.answer
        else:
            prediction = continue_greedily(item, tokenizer, logits_fn, seq_len, max_new_tokens)
            correct = prediction == item.answer.strip()
        out.append({"prediction": prediction, "correct": correct})
        advance(1)
    return out
