"""Make the embedded example's evaluation task (docs/QUALITY.md) from its own held-out code.

Writes examples/stdlib-coder/task.jsonl from eval.txt (made by make_example_model.py):

- multiple choice, "which line comes next": a few lines of code, then the true next line
  and three orders of its words (the same indentation and characters, so no choice wins
  by length), in a shuffled order;
- exact match, "finish the line": the code up to a line's first word (`return`, `import`,
  `raise`, ...), answered by the rest of that line.

Deterministic from the seed and eval.txt. The file is committed: eval.txt depends on the
interpreter's standard library, and a task must not change under a build.

    python examples/make_example_task.py [--out examples/stdlib-coder]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

SEED = 22
MULTIPLE_CHOICE = 48
EXACT_MATCH = 8  # the example model is too small to finish many lines: a few, for the path
CONTEXT_LINES = 6
CONTEXT_CHARS = 240
KEYWORD = re.compile(r"^(\s*(?:return|import|from|raise|del|assert))( \S.{2,30})$")


def indent(line: str) -> str:
    return line[:len(line) - len(line.lstrip())]


def usable(line: str) -> bool:
    """A line worth asking about: code (not a comment or a docstring), of moderate length."""
    text = line.strip()
    return 12 <= len(text) <= 60 and not text.startswith(("#", '"', "'")) and text.isascii()


def context(lines: list[str], i: int) -> str | None:
    """The lines before line i, ending with a newline, or None when they are mostly blank."""
    before = lines[max(0, i - CONTEXT_LINES):i]
    if sum(1 for line in before if line.strip()) < CONTEXT_LINES // 2:
        return None
    return ("\n".join(before) + "\n")[-CONTEXT_CHARS:]


def shuffled_words(line: str, rng: random.Random, count: int = 3) -> list[str]:
    """`count` other orders of the line's words (same indentation), fewer if it has none."""
    words, orders = line.split(), set()
    for _ in range(20 * count):
        rng.shuffle(words)
        candidate = indent(line) + " ".join(words)
        if candidate != line:
            orders.add(candidate)
        if len(orders) == count:
            break
    return sorted(orders)


def multiple_choice(lines: list[str], rng: random.Random) -> list[dict]:
    items, order = [], list(range(CONTEXT_LINES, len(lines)))
    rng.shuffle(order)
    for i in order:
        line, prompt = lines[i], context(lines, i)
        if prompt is None or not usable(line):
            continue
        others = shuffled_words(line, rng)
        if len(others) < 3:
            continue
        choices = [line] + others
        rng.shuffle(choices)
        items.append({"id": f"next-line-{i}", "prompt": prompt, "choices": choices,
                      "answer": choices.index(line)})
        if len(items) == MULTIPLE_CHOICE:
            break
    return items


def exact_match(lines: list[str], rng: random.Random) -> list[dict]:
    candidates = [i for i in range(CONTEXT_LINES, len(lines)) if KEYWORD.match(lines[i])]
    items = []
    for i in rng.sample(candidates, len(candidates)):
        prompt = context(lines, i)
        if prompt is None:
            continue
        head, rest = KEYWORD.match(lines[i]).groups()
        items.append({"id": f"finish-line-{i}", "prompt": prompt + head, "answer": rest.strip()})
        if len(items) == EXACT_MATCH:
            break
    return items


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "stdlib-coder")
    args = parser.parse_args()
    lines = (args.out / "eval.txt").read_text(encoding="utf-8").split("\n")
    rng = random.Random(SEED)
    items = multiple_choice(lines, rng) + exact_match(lines, rng)
    with open(args.out / "task.jsonl", "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    print(f"wrote {len(items)} items to {args.out / 'task.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
