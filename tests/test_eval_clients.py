"""Real clients against `dwc serve`: the official `openai` SDK, and lm-evaluation-harness
scoring a multiple-choice task (written here, over a local file) through its
local-completions model, against its `hf` model on the original checkpoint. And a
quantized bundle's served prompt logprobs, within the KL its build measured."""

from __future__ import annotations

import json
import random

import httpx
import pytest
import torch

from dwc.runtime.engine import Engine, EngineConfig
from dwc.perf.soak import serving
from tests.conftest import manifest_of


@pytest.fixture(scope="module")
def served(bundle):
    engine = Engine.from_bundle(bundle, EngineConfig(num_blocks=256, max_num_seqs=16,
                                                     max_num_batched_tokens=512))
    with serving(engine, max_waiting=64, model_name="stdlib-coder") as (url, _):
        yield url


def test_the_openai_client(served):
    import openai

    client = openai.OpenAI(base_url=f"{served}/v1", api_key="none", max_retries=0)
    echo = client.completions.create(model="stdlib-coder", prompt="import os\nimport sys\n",
                                     max_tokens=0, echo=True, logprobs=2)
    lp = echo.choices[0].logprobs
    assert echo.choices[0].text == "import os\nimport sys\n" and lp.token_logprobs[0] is None
    assert all(v < 0 for v in lp.token_logprobs[1:]) and len(lp.tokens) == len(lp.text_offset)
    many = client.completions.create(model="stdlib-coder", prompt="def f(", max_tokens=4, n=3,
                                     seed=5, temperature=1.0, logprobs=1)
    assert sorted(c.index for c in many.choices) == [0, 1, 2]
    assert all(len(c.logprobs.token_logprobs) == len(c.logprobs.tokens) for c in many.choices)
    assert many.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in many.choices)
    chat = client.chat.completions.create(
        model="stdlib-coder", messages=[{"role": "user", "content": "write a loop"}],
        max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert content and all(len(c.top_logprobs) == 3 for c in content)
    stream = client.completions.create(model="stdlib-coder", prompt="class A:", max_tokens=5,
                                       temperature=0, logprobs=1, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == sum(
        len(c.choices[0].logprobs.tokens) for c in chunks if c.choices and c.choices[0].logprobs)


def multiple_choice_docs(text: str, n: int, seed: int = 0) -> list[dict]:
    """Code lines of held-out text: the context is the two lines before and the line's
    first half, the choices its true second half and three others'."""
    lines = text.splitlines()
    rng = random.Random(seed)
    picks = [i for i in range(2, len(lines)) if 30 <= len(lines[i].strip()) <= 70]
    docs = []
    for i in rng.sample(picks, n):
        cut = len(lines[i]) // 2
        others = rng.sample([j for j in picks if lines[j][len(lines[j]) // 2:] != lines[i][cut:]], 3)
        choices = [lines[j][len(lines[j]) // 2:] for j in others]
        label = rng.randrange(4)
        choices.insert(label, lines[i][cut:])
        docs.append({"context": "\n".join(lines[i - 2:i] + [lines[i][:cut]]),
                     "choices": choices, "label": label})
    return docs


TASK = """task: dwc_code_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""


@pytest.mark.slow
def test_lm_eval_scores_dwc_serve_like_transformers(served, example, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    docs = multiple_choice_docs((example / "eval.txt").read_text(), 40)
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "dwc_code_mc.yaml").write_text(TASK.format(data=data))
    checkpoint = example / "checkpoint"

    def run(model: str, args: str):
        out = simple_evaluate(model=model, model_args=args, tasks=["dwc_code_mc"],
                              task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                              bootstrap_iters=0, log_samples=True, random_seed=0)
        samples = out["samples"]["dwc_code_mc"]
        scores = {s["doc_id"]: [r[0] for r in s["filtered_resps"]] for s in samples}
        return out["results"]["dwc_code_mc"]["acc,none"], scores

    served_acc, served_ll = run("local-completions", (
        f"base_url={served}/v1/completions,model=stdlib-coder,tokenizer_backend=huggingface,"
        f"tokenizer={checkpoint},max_length=1024,num_concurrent=1,max_retries=1"))
    hf_acc, hf_ll = run("hf", f"pretrained={checkpoint},dtype=float32,device=cpu,batch_size=8")
    assert served_acc > 0.4  # well above chance (0.25): the scores mean something
    diffs = [abs(a - b) for d in hf_ll for a, b in zip(served_ll[d], hf_ll[d])]
    print(f"lm-eval acc: dwc serve {served_acc:.3f}, hf {hf_acc:.3f}; max |d loglik| {max(diffs):.4f}")
    # The bundle serves bf16 weights, the hf model runs the float32 original: per token the
    # logprobs differ by up to ~1e-2 (measured max over a choice's tokens: 0.037).
    assert len(diffs) == 4 * len(docs) and max(diffs) < 0.05, max(diffs)
    assert abs(served_acc - hf_acc) <= 1 / len(docs)  # at most one near-tie flips


@pytest.mark.slow
def test_quantized_bundle_logprobs_within_its_measured_kl(build_for, example):
    """The served values are the quantized model's: they differ from the original's by
    more than float rounding, and the KL between the original's distribution and the
    served one stays within the build's measured KL. Only the top 20 are served, so the
    KL is taken over (those 20, everything else): never more than the full KL."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bundle = build_for("a100-int8-sq")
    measured = manifest_of(bundle)["quality"]["kl_divergence"]
    engine = Engine.from_bundle(bundle, EngineConfig(device="cpu", num_blocks=128))
    text = (example / "eval.txt").read_text()[:1500]
    with serving(engine, model_name="q") as (url, _):
        lp = httpx.post(f"{url}/v1/completions", timeout=300, json={
            "prompt": text, "max_tokens": 0, "echo": True, "logprobs": 20}).json()["choices"][0]["logprobs"]
    tok = AutoTokenizer.from_pretrained(example / "checkpoint")
    model = AutoModelForCausalLM.from_pretrained(example / "checkpoint", dtype=torch.float32)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    served_lp = torch.tensor(lp["token_logprobs"][1:])
    original = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert (served_lp - original).abs().max() > 1e-2  # not the original model's values
    by_text: dict[str, list[int]] = {}
    for t in range(ref.shape[-1]):
        by_text.setdefault(tok.decode([t]), []).append(t)
    kls = []
    for i in range(1, len(ids)):  # served top 20 by text; texts two ids share are skipped
        pairs = [(by_text[t][0], v) for t, v in lp["top_logprobs"][i].items()
                 if len(by_text.get(t, ())) == 1]
        p = ref[i - 1].exp()[[t for t, _ in pairs]]
        q = torch.tensor([v for _, v in pairs]).exp()
        p_rest, q_rest = (1 - p.sum()).clamp_min(1e-12), (1 - q.sum()).clamp_min(1e-12)
        kls.append(((p * (p / q).log()).sum() + p_rest * (p_rest / q_rest).log()).item())
    coarse = sum(kls) / len(kls)
    print(f"served vs original: coarse KL {coarse:.3g}, the build's KL {measured:.3g}")
    assert 0 < coarse <= 3 * measured, (coarse, measured)
