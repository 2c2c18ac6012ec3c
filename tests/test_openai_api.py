"""The OpenAI API that evaluation and benchmark tools need, on a cpu-bf16 bundle: logprobs
(prompt and generated, against transformers), echo, n / best_of with seeds and the prefix
cache, streaming, and the answers that are not 200: 400, 413, 429, 503."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from dwc.runtime.engine import Engine, EngineConfig
from dwc.perf.soak import server_errors, serving
from tests.conftest import manifest_of

BATCH = 128  # max_num_batched_tokens: a long prompt's logprobs come from several chunks


@pytest.fixture(scope="module")
def served(bundle):
    engine = Engine.from_bundle(bundle, EngineConfig(num_blocks=256, max_num_seqs=16,
                                                     max_num_batched_tokens=BATCH))
    with serving(engine, max_waiting=64, model_name="stdlib-coder") as (url, api):
        yield url, engine, api


@pytest.fixture(scope="module")
def original(example, bundle):
    """transformers in float32 on the bundle's weights (the bf16 the bundle serves, upcast)
    and on the original float32 checkpoint, and a text of the model's kind."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    served = AutoModelForCausalLM.from_pretrained(bundle / "model", dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(example / "checkpoint", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(example / "checkpoint")
    text = (example / "eval.txt").read_text()[:1200]
    return served, tok, text, model


def reference(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] float32 log-softmax; row i scores token i + 1."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def post(url: str, body: dict, path: str = "/v1/completions") -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=120)


def test_echoed_prompt_logprobs_equal_transformers(served, original, bundle):
    url, _, _ = served
    model, tok, text, checkpoint = original
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 2 * BATCH  # computed over three chunks
    r = post(url, {"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    choice, lp = body["choices"][0], body["choices"][0]["logprobs"]
    assert choice["text"] == text and choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0,
                             "total_tokens": len(ids)}
    assert len(lp["tokens"]) == len(ids) and "".join(lp["tokens"]) == text
    assert all(text[o:].startswith(t) for t, o in zip(lp["tokens"], lp["text_offset"]))
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ref = reference(model, ids)
    want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    got = torch.tensor(lp["token_logprobs"][1:])
    assert (got - want).abs().max().item() < 1e-3
    # Against the original float32 checkpoint the bf16 rounding of the weights shows: the
    # values agree within the bundle's own measured KL, not within 1e-3.
    orig = reference(checkpoint, ids)
    kl = (orig.exp() * (orig - ref)).sum(-1).mean().item()
    print(f"served vs bundle weights max {(got - want).abs().max().item():.2e}; vs original max "
          f"{(got - orig[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]).abs().max().item():.2e}"
          f", KL {kl:.3g} (build's {manifest_of(bundle)['quality']['kl_divergence']:.3g})")
    assert kl <= 2 * manifest_of(bundle)["quality"]["kl_divergence"] + 1e-6, kl
    for i in (1, len(ids) // 2, len(ids) - 1):  # the top 5 (and the chosen token) by text
        top = lp["top_logprobs"][i]
        values, top_ids = ref[i - 1].topk(5)
        for t, v in zip(top_ids.tolist(), values.tolist()):
            assert abs(top[tok.decode([t])] - v) < 1e-3
        assert len(top) in (5, 6)


def test_generated_logprobs_greedy_and_streamed_alike(served, original):
    url, _, _ = served
    model, tok, text, _ = original
    prompt = text[:200]
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 3,
            "ignore_eos": True}
    whole = post(url, body).json()["choices"][0]
    lp = whole["logprobs"]
    assert len(lp["tokens"]) == 8 and "".join(lp["tokens"]) == whole["text"]
    assert lp["text_offset"][0] == 0
    for value, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert value == max(top.values()) and len(top) == 3  # greedy: the chosen is the top
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    out = tok(whole["text"], add_special_tokens=False)["input_ids"]
    ref = reference(model, ids + out)
    want = [ref[len(ids) - 1 + i, t].item() for i, t in enumerate(out)]
    if len(out) == 8:  # the text re-tokenizes to the same ids (almost always)
        assert max(abs(a - b) for a, b in zip(lp["token_logprobs"], want)) < 1e-3
    streamed = {"tokens": [], "token_logprobs": [], "text_offset": []}
    with httpx.stream("POST", f"{url}/v1/completions", json=body | {"stream": True},
                      timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                piece = json.loads(line[6:])["choices"][0]["logprobs"]
                for key in streamed if piece else ():
                    streamed[key] += piece[key]
    assert streamed == {key: lp[key] for key in streamed}


def test_chat_logprobs(served):
    url, _, _ = served
    r = post(url, {"messages": [{"role": "user", "content": "write a loop"}], "max_tokens": 5,
                   "temperature": 0, "logprobs": True, "top_logprobs": 2, "ignore_eos": True},
             "/v1/chat/completions")
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == 5
    assert "".join(c["token"] for c in content) == choice["message"]["content"]
    for c in content:
        assert len(c["top_logprobs"]) == 2 and c["logprob"] == c["top_logprobs"][0]["logprob"]
        assert c["bytes"] == list(c["token"].encode())
    plain = post(url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                 "/v1/chat/completions").json()["choices"][0]
    assert plain["logprobs"] is None


def test_n_with_a_seed_is_reproducible_distinct_and_shares_the_prompt(served, original):
    url, engine, _ = served
    _, tok, text, _ = original
    prompt = text[:400]
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    body = {"prompt": prompt, "n": 4, "seed": 7, "temperature": 1.0, "max_tokens": 12,
            "ignore_eos": True}
    hits = engine.blocks.hits
    first = post(url, body).json()
    shared = engine.blocks.hits - hits
    assert shared >= 3 * ((len(ids) - 1) // 16) * 16  # choices 1..3 took choice 0's blocks
    texts = [c["text"] for c in sorted(first["choices"], key=lambda c: c["index"])]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2, 3]
    assert len(set(texts)) == 4
    assert first["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 48,
                              "total_tokens": len(ids) + 48}
    again = post(url, body).json()
    assert [c["text"] for c in again["choices"]] == texts
    one = post(url, {**body, "n": 1}).json()["choices"][0]["text"]
    assert one == texts[0]  # choice 0 keeps the request's seed


def test_prompt_lists_best_of_and_echo_with_n(served, original):
    url, _, _ = served
    _, tok, text, _ = original
    a, b = tok(text[:60])["input_ids"], tok(text[60:90])["input_ids"]
    r = post(url, {"prompt": [a, b], "n": 2, "max_tokens": 3, "temperature": 0}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    assert r["choices"][0]["text"] == r["choices"][1]["text"]  # greedy: the same twice
    assert r["usage"]["prompt_tokens"] == len(a) + len(b)
    strings = post(url, {"prompt": [text[:60], text[60:90]], "max_tokens": 3,
                         "temperature": 0}).json()
    assert [c["text"] for c in strings["choices"]] == [c["text"] for c in r["choices"][::2]]
    best = post(url, {"prompt": text[:60], "n": 1, "best_of": 3, "max_tokens": 6,
                      "temperature": 1.0, "seed": 3}).json()
    assert len(best["choices"]) == 1 and best["choices"][0]["logprobs"] is None
    echo = post(url, {"prompt": text[:80], "n": 2, "echo": True, "logprobs": 1,
                      "max_tokens": 2, "temperature": 1.0, "seed": 1}).json()["choices"]
    heads = [c["logprobs"]["token_logprobs"][:len(tok(text[:80])["input_ids"])] for c in echo]
    assert heads[0] == heads[1] and heads[0][0] is None
    assert all(c["text"].startswith(text[:80]) for c in echo)


@pytest.mark.parametrize("body, fragment", [
    ({"logprobs": 21}, "logprobs"), ({"max_tokens": 0}, "max_tokens: 0 is allowed only"),
    ({"prompt": [10 ** 6]}, "outside the vocabulary"), ({"n": 2, "best_of": 1}, "best_of"),
    ({"best_of": 2, "stream": True}, "cannot be streamed"), ({"n": 0}, "n: invalid"),
    ({"prompt": [[1], "x"]}, "prompt: expected"), ({"top_logprobs": 2}, "unknown field"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_bad_fields_are_400(served, body, fragment):
    r = post(served[0], {"prompt": "import os", **body})
    assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text


def test_chat_fields_and_no_500_for_edge_values(served):
    url = served[0]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for extra, fragment in (({"top_logprobs": 2}, "needs \"logprobs\": true"),
                            ({"logprobs": 1}, "expected true or false"),
                            ({"echo": True}, "unknown field")):
        r = post(url, chat | extra, "/v1/chat/completions")
        assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text
    # A tiny temperature overflowed logits / T into NaN and failed the whole batch's step.
    for body in ({"temperature": 1e-300}, {"top_k": 10 ** 9}, {"max_completion_tokens": 1}):
        path = "/v1/chat/completions" if "max_completion_tokens" in body else "/v1/completions"
        base = chat if "max_completion_tokens" in body else {"prompt": "x", "max_tokens": 2}
        assert post(url, base | body, path).status_code == 200, body


def test_chat_without_a_template_is_400_and_logs_nothing(served):
    url, _, api = served
    template, api.tokenizer.chat_template = api.tokenizer.chat_template, None
    try:
        with server_errors() as errors:
            r = post(url, {"messages": [{"role": "user", "content": "hi"}]}, "/v1/chat/completions")
    finally:
        api.tokenizer.chat_template = template
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
    assert errors == []


def test_chat_n_and_streamed_n(served):
    url = served[0]
    chat = post(url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "n": 2,
                      "seed": 3, "temperature": 1.0}, "/v1/chat/completions").json()
    assert [c["index"] for c in chat["choices"]] == [0, 1]
    assert chat["usage"]["completion_tokens"] <= 8
    texts, reasons = {0: "", 1: ""}, {}
    with httpx.stream("POST", f"{url}/v1/completions", timeout=120, json={
            "prompt": "import os", "max_tokens": 5, "n": 2, "stream": True, "seed": 3,
            "temperature": 1.0, "ignore_eos": True}) as r:
        ids = set()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                ids.add(chunk["id"])
                c = chunk["choices"][0]
                texts[c["index"]] += c["text"]
                if c["finish_reason"]:
                    reasons[c["index"]] = c["finish_reason"]
    whole = post(url, {"prompt": "import os", "max_tokens": 5, "n": 2, "seed": 3,
                       "temperature": 1.0, "ignore_eos": True}).json()["choices"]
    assert len(ids) == 1 and reasons == {0: "length", 1: "length"}
    assert [texts[0], texts[1]] == [c["text"] for c in whole]


def test_logprob_pieces_decode_windows_and_join_like_whole_prefixes(bundle):
    """Pieces, decoded over a window of recent tokens, give each token the same text and
    offset as decoding whole prefixes would (multi-byte characters split across tokens
    included), with a bounded decode per token."""
    from dwc.runtime.engine import Engine, EngineConfig
    from dwc.serving.openai_logprobs import Pieces

    tok = Engine.from_bundle(bundle, EngineConfig(num_blocks=16)).tokenizer
    text = "import os  # h\u00e9llo \U0001F600 \u4e16\u754c\n    return x\n" * 30
    ids = tok(text, add_special_tokens=False)["input_ids"]
    want, stable = [], ""
    for n in range(1, len(ids) + 1):  # the whole-prefix definition
        t = tok.decode(ids[:n]).rstrip("\ufffd")
        want.append((t[len(stable):], 7 + len(stable)))
        stable = t if len(t) > len(stable) else stable
    lengths = []

    class Counting:
        def decode(self, part):
            lengths.append(len(part))
            return tok.decode(part)

    pieces = Pieces(Counting(), 7)
    got = pieces.add(ids[:5]) + pieces.add(ids[5:])
    assert got == want and "".join(p for p, _ in got) == text
    assert max(lengths) <= 8


def test_streamed_text_joins_to_the_answer_with_and_without_a_stop_string(served, original):
    """The streamed deltas (decoded token by token, held back where a stop string may
    start) join to the non-streamed answer's text."""
    url, _, _ = served
    _, _, text, _ = original
    body = {"prompt": text[300:420], "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    whole = post(url, body).json()["choices"][0]["text"]
    for stop in ([], [whole[30:33]]):
        want = post(url, body | {"stop": stop}).json()["choices"][0]["text"]
        assert want == (whole[:whole.find(stop[0])] if stop else whole)
        got = ""
        with httpx.stream("POST", f"{url}/v1/completions", timeout=120,
                          json=body | {"stop": stop, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    choices = json.loads(line[6:])["choices"]
                    got += "".join(c["text"] for c in choices)
        assert got == want
