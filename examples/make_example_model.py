"""Train dwc's embedded example model: a small Llama on the Python standard library.

No machine here can download weights or data sets, so the project makes its own: a
byte-level BPE tokenizer and a small Llama-architecture causal LM, both trained on the
source of the running interpreter's standard library, saved in Hugging Face layout
(config.json, model.safetensors, tokenizer.json) so transformers, vLLM and dwc load it.

Deterministic from the seed. The result is cached twice: in the output folder (a stamp
file holds the key) and under $DWC_CACHE_DIR/examples/<key> (default ~/.cache/dwc), so a
fresh clone on the same machine reuses it. The key covers this script, the corpus file
list and the torch / transformers / tokenizers versions.

    python examples/make_example_model.py --out examples/stdlib-coder
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import sys
import sysconfig
import time
from pathlib import Path

STAMP = "dwc-example.json"
SEED = 1234
VOCAB_SIZE = 4096
SEQ_LEN = 256
# GQA on purpose (4 query heads share 2 KV heads), head_dim 64 like real models. About
# 5.2M parameters; 260 steps of 16 x 256 tokens take about 4 minutes on 2 cores.
MODEL = dict(hidden=256, layers=4, heads=4, kv_heads=2, ffn=768, steps=260, batch=16)
TRAIN_BYTES = 6_000_000  # enough text for the steps we take; tokenizer trains on it too
HELDOUT_BYTES = 300_000  # per split (calibration, evaluation)
SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}


def corpus_files() -> list[Path]:
    """Every .py file of the stdlib, sorted, without tests (they repeat a lot)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if not SKIP_DIRS.intersection(rel.parts[:-1]):
            files.append(path)
    return files


def split_of(rel: str) -> str:
    """Disjoint splits by file: a file lands in exactly one of train / calib / eval."""
    bucket = int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 20
    return "calib" if bucket == 0 else "eval" if bucket == 1 else "train"


def read_splits(files: list[Path]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """The text of each split, and which stdlib files went into it."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: dict[str, list[str]] = {"train": [], "calib": [], "eval": []}
    names: dict[str, list[str]] = {"train": [], "calib": [], "eval": []}
    sizes = {"train": 0, "calib": 0, "eval": 0}
    limits = {"train": TRAIN_BYTES, "calib": HELDOUT_BYTES, "eval": HELDOUT_BYTES}
    for path in files:
        split = split_of(str(path.relative_to(root)))
        if sizes[split] >= limits[split]:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        parts[split].append(text)
        names[split].append(str(path.relative_to(root)))
        sizes[split] += len(text)
    return {k: "\n\n".join(v) for k, v in parts.items()}, names


def cache_key(files: list[Path]) -> str:
    import tokenizers
    import torch
    import transformers

    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    for f in files:
        h.update(f"{f.name}:{f.stat().st_size}\n".encode())
    versions = (sys.version_info[:2], torch.__version__, transformers.__version__,
                tokenizers.__version__)
    h.update(repr(versions).encode())
    return h.hexdigest()[:16]


def train_tokenizer(text: str, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # GPT-2's byte-level pre-tokenizer: every byte is representable, no <unk> needed.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    chunks = [text[i:i + 100_000] for i in range(0, len(text), 100_000)]
    tok.train_from_iterator(chunks, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", unk_token=None)
    # A plain chat template so chat-format (.jsonl "messages") data works end to end.
    fast.chat_template = (
        "{% for m in messages %}# {{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}# assistant:\n{% endif %}")
    fast.save_pretrained(out)
    return fast


def batches(ids, batch: int, seq_len: int, rng: random.Random):
    import torch

    while True:
        starts = [rng.randrange(0, len(ids) - seq_len - 1) for _ in range(batch)]
        yield torch.stack([ids[s:s + seq_len] for s in starts])


def heldout_ppl(model, ids, seq_len: int, max_windows: int = 48) -> float:
    import torch

    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, min(len(ids) - 1, max_windows * seq_len), seq_len):
            window = ids[i:i + seq_len + 1]
            if len(window) < 2:
                break
            out = model(window[:-1][None], labels=window[:-1][None])
            n = len(window) - 2
            nll += out.loss.item() * n
            count += n
    model.train()
    return math.exp(nll / count)


def train(out: Path) -> dict:
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = MODEL
    transformers.utils.logging.disable_progress_bar()
    random.seed(SEED)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    splits, split_files = read_splits(corpus_files())
    tokenizer = train_tokenizer(splits["train"], out / "checkpoint")
    ids = torch.tensor(tokenizer(splits["train"])["input_ids"], dtype=torch.long)
    eval_ids = torch.tensor(tokenizer(splits["eval"])["input_ids"], dtype=torch.long)

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg["hidden"], intermediate_size=cfg["ffn"],
        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["kv_heads"], max_position_embeddings=1024,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    steps, warmup = cfg["steps"], 20
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    rng = random.Random(SEED)
    t0 = time.time()
    for step, x in zip(range(steps), batches(ids, cfg["batch"], SEQ_LEN, rng)):
        loss = model(x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 20 == 0 or step == steps - 1:
            print(f"  step {step:4d}/{steps}  loss {loss.item():.3f}  "
                  f"{time.time() - t0:6.1f}s", flush=True)
    ppl = heldout_ppl(model, eval_ids, SEQ_LEN)
    model.save_pretrained(out / "checkpoint")  # float32 safetensors
    (out / "calib.txt").write_text(splits["calib"], encoding="utf-8")
    (out / "eval.txt").write_text(splits["eval"], encoding="utf-8")
    return {"params": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(tokenizer), "steps": steps, "train_tokens": steps * cfg["batch"] * SEQ_LEN,
            "heldout_ppl": round(ppl, 3), "train_seconds": round(time.time() - t0, 1),
            "split_files": split_files}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--force", action="store_true", help="retrain even when cached")
    args = parser.parse_args()

    key = cache_key(corpus_files())
    stamp = args.out / STAMP
    if not args.force and stamp.exists() and json.loads(stamp.read_text()).get("key") == key:
        print(f"example model up to date: {args.out}/checkpoint")
        return 0
    cache_root = Path(os.environ.get("DWC_CACHE_DIR", Path.home() / ".cache" / "dwc"))
    cached = cache_root / "examples" / key
    if not args.force and (cached / STAMP).exists():
        print(f"example model from cache: {cached}")
    else:
        print("training the example model; takes about 4 minutes on 2 cores")
        tmp = cached.with_name(f"{key}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "checkpoint").mkdir(parents=True)
        report = train(tmp)
        report["key"] = key
        (tmp / STAMP).write_text(json.dumps(report, indent=2) + "\n")
        shutil.rmtree(cached, ignore_errors=True)
        os.replace(tmp, cached)
        print(f"held-out perplexity {report['heldout_ppl']} (vocabulary {report['vocab_size']})")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("checkpoint", "calib.txt", "eval.txt", STAMP):
        dst = args.out / name
        if dst.is_dir():
            shutil.rmtree(dst)
        (shutil.copytree if (cached / name).is_dir() else shutil.copy2)(cached / name, dst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
