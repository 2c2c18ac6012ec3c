"""The Qwen2 model shape that crashed llama.cpp (issue 17), as a small trained checkpoint.

Qwen2 architecture, hidden 256, 8 attention heads and 2 KV heads (head_dim 32), 6 layers,
tied embeddings, q/k/v biases, vocabulary 4096, byte-level BPE: the example's tokenizer
(examples/make_example_model.py). Quality tests need trained weights (DESIGN.md §11), and
training from scratch takes minutes; the embeddings start from the example's trained ones
(same vocabulary, same width), so a short run on the example's calibration text gives
next-token distributions that a quantization error can visibly change.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

SHAPE = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
             num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
             max_position_embeddings=512)
STEPS, BATCH, SEQ_LEN, SEED = 120, 8, 128, 0


def cached_qwen2_shape(example: Path, cache: Path) -> Path:
    """The trained checkpoint, made once per key under `cache` (build/test-fixtures): the
    key covers this file, the example model it starts from and the library versions."""
    import torch
    import transformers

    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update((example / "dwc-example.json").read_bytes())
    h.update(f"{torch.__version__} {transformers.__version__}".encode())
    folder = cache / f"qwen2-shape-{h.hexdigest()[:16]}"
    if not (folder / "fixture.json").is_file():
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        report = make_qwen2_shape(example, tmp)
        (tmp / "fixture.json").write_text(json.dumps(report))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    return folder


def make_qwen2_shape(example: Path, out: Path, steps: int = STEPS) -> dict:
    """Train the shape and save it to `out` (Hugging Face layout); returns a small report."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    random.seed(SEED)
    torch.manual_seed(SEED)
    source = example / "checkpoint"
    tok = AutoTokenizer.from_pretrained(source)
    config = Qwen2Config(**SHAPE, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, rms_norm_eps=1e-6, rope_theta=10000.0)
    model = Qwen2ForCausalLM(config)
    attn = model.model.layers[0].self_attn
    assert attn.head_dim == 32 and attn.q_proj.bias is not None and attn.k_proj.out_features == 64
    embed = load_file(source / "model.safetensors")["model.embed_tokens.weight"]  # [4096, 256]
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(embed)
    ids = torch.tensor(tok((example / "calib.txt").read_text(encoding="utf-8"))["input_ids"])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    rng = random.Random(SEED)
    t0 = time.perf_counter()
    model.train()
    for _ in range(steps):
        starts = [rng.randrange(len(ids) - SEQ_LEN) for _ in range(BATCH)]
        x = torch.stack([ids[s:s + SEQ_LEN] for s in starts])              # [BATCH, SEQ_LEN]
        loss = model(x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    return {"loss": round(loss.item(), 3), "seconds": round(time.perf_counter() - t0, 1)}
