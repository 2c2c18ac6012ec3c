"""`dwc serve` over loopback: a bounded load of valid, streaming, malformed and
disconnecting requests; every valid one answered, every block returned."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from dwc.runtime.engine import Engine, EngineConfig
from dwc.runtime.sequence import SamplingParams
from dwc.perf.soak import serving
from tests.test_runtime import PROMPTS


@pytest.fixture(scope="module")
def server(bundle):
    engine = Engine.from_bundle(bundle, EngineConfig(num_blocks=256, max_num_seqs=16,
                                                     max_num_batched_tokens=256))
    with serving(engine, max_waiting=64, model_name="stdlib-coder") as (url, _):
        yield url, engine


def test_endpoints_and_errors(server):
    url, engine = server
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/health").json() == {"status": "ok", "failed_steps": 0}
        assert c.get("/v1/models").json()["data"][0]["id"] == "stdlib-coder"
        r = c.post("/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 6,
                                            "temperature": 0})
        body = r.json()
        assert r.status_code == 200 and body["usage"]["completion_tokens"] <= 6
        chat = c.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "write a loop"}], "max_tokens": 5})
        assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"
        assert c.post("/v1/completions", content=b"{nope").status_code == 400
        bad = c.post("/v1/completions", json={"prompt": "x", "max_tokens": -3})
        assert bad.status_code == 400 and "max_tokens" in bad.json()["error"]["message"]
        long = c.post("/v1/completions", json={"prompt": "x " * 2000, "max_tokens": 4})
        assert long.status_code == 400 and "context limit of 1024" in long.json()["error"]["message"]
        assert c.post("/v1/chat/completions", json={"messages": "hi"}).status_code == 400
        for bad in ({"seed": 2 ** 64}, {"seed": -1}, {"top_p": 0}, {"temperature": 3}):
            r = c.post("/v1/completions", json={"prompt": "x", **bad})
            assert r.status_code == 400, bad
        ok = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2,
                                             "temperature": None, "top_p": None})
        assert ok.status_code == 200
        metrics = c.get("/metrics").text
        for name in ("dwc_queue_depth", "dwc_running_sequences", "dwc_kv_blocks_used",
                     "dwc_prefix_cache_hit_rate", "dwc_time_to_first_token_seconds_bucket",
                     "dwc_time_per_output_token_seconds_bucket"):
            assert name in metrics


def test_greedy_over_http_equals_the_engine(server, bundle):
    url, _ = server
    want = Engine.from_bundle(bundle, EngineConfig(num_blocks=64)).generate(
        [PROMPTS[0]], SamplingParams(max_tokens=12))[0].text
    got = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 12,
                                                   "temperature": 0}, timeout=30).json()
    assert got["choices"][0]["text"] == want
    pieces = []
    with httpx.stream("POST", f"{url}/v1/completions", timeout=30, json={
            "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
    assert "".join(pieces) == want


def test_bounded_load_with_streams_malformed_and_disconnects(server):
    url, engine = server

    async def one(client, i):
        kind = i % 6
        if kind == 0:
            r = await client.post("/v1/completions", content=b"not json")
            return r.status_code == 400
        if kind == 1:  # disconnect after the first streamed chunk
            async with client.stream("POST", "/v1/completions", json={
                    "prompt": PROMPTS[i % 4], "max_tokens": 40, "stream": True,
                    "temperature": 0, "ignore_eos": True}) as r:
                async for _ in r.aiter_lines():
                    break
            return True
        stream = kind in (2, 3)
        payload = {"prompt": PROMPTS[i % 4] + str(i), "max_tokens": 1 + i % 6, "stream": stream,
                   "temperature": 0.7, "seed": i}
        if stream:
            done = False
            async with client.stream("POST", "/v1/completions", json=payload) as r:
                if r.status_code == 429:
                    return True
                async for line in r.aiter_lines():
                    done = done or line == "data: [DONE]"
            return done
        r = await client.post("/v1/completions", json=payload)
        return r.status_code == 429 or (r.status_code == 200 and r.json()["choices"][0]["finish_reason"])

    async def main():
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
            sem = asyncio.Semaphore(32)

            async def bounded(i):
                async with sem:
                    return await one(client, i)
            return await asyncio.wait_for(asyncio.gather(*(bounded(i) for i in range(300))), 240)

    results = asyncio.run(main())
    assert all(results)
    deadline = time.time() + 30  # aborted sequences are freed at the engine's next step
    while (engine.has_work() or engine.blocks.num_free < 256) and time.time() < deadline:
        time.sleep(0.1)
    assert not engine.has_work()
    assert engine.blocks.num_free == 256


def test_full_queue_answers_429(bundle):
    from starlette.testclient import TestClient

    from dwc.serving.http_server import make_app

    app = make_app(Engine.from_bundle(bundle, EngineConfig(num_blocks=16)), "x", max_waiting=0)
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"prompt": "import os", "max_tokens": 2})
        assert r.status_code == 429 and "server busy" in r.json()["error"]["message"]


def test_sigterm_drains_in_flight_requests(bundle):
    """`dwc serve` on SIGTERM stops accepting, finishes the stream in flight, then ends by
    the signal (uvicorn re-raises it after draining, so supervisors see a SIGTERM exit)."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dwc", "serve", str(bundle), "--port",
                             str(port)], stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        lines = []
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60, json={
                "prompt": PROMPTS[0], "max_tokens": 60, "stream": True, "ignore_eos": True,
                "temperature": 0}) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and not lines:
                    proc.send_signal(signal.SIGTERM)  # mid-stream
                lines.append(line)
        assert lines[-1] == "data: [DONE]" or "data: [DONE]" in lines
        chunks = [json.loads(l[6:]) for l in lines if l.startswith("data: {")]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=60) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_failing_step_ends_its_requests_and_the_engine_goes_on(bundle, monkeypatch):
    from starlette.testclient import TestClient

    from dwc.serving.http_server import make_app

    engine = Engine.from_bundle(bundle, EngineConfig(num_blocks=64))
    real_run = engine.runner.run
    fail = {"next": True}

    def flaky(*args, **kwargs):
        if fail["next"]:
            fail["next"] = False
            raise RuntimeError("injected failure")
        return real_run(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "run", flaky)
    with TestClient(make_app(engine, "x")) as client:
        first = client.post("/v1/completions", json={"prompt": "import os", "max_tokens": 3})
        assert first.status_code == 500 and "injected failure" in first.json()["error"]["message"]
        second = client.post("/v1/completions", json={"prompt": "import os", "max_tokens": 3})
        assert second.status_code == 200
        fail["next"] = True
        with client.stream("POST", "/v1/completions", json={
                "prompt": "import os", "max_tokens": 3, "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert "injected failure" in lines[-1] and "data: [DONE]" not in lines
        assert client.get("/health").json()["failed_steps"] == 2
    assert engine.blocks.num_free == 64


def test_streaming_holds_back_split_characters_and_stop_prefixes(bundle):
    from dwc.serving.http_server import releasable

    tok = Engine.from_bundle(bundle, EngineConfig(num_blocks=16)).tokenizer
    text = "h\u00e9llo \U0001F600 \u4e16\u754c"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    sent = ""
    for n in range(1, len(ids) + 1):
        partial = tok.decode(ids[:n])
        ready = releasable(partial, len(sent), hold=0)
        assert "\ufffd" not in ready and ready.startswith(sent)
        sent = ready
    assert sent == text
    assert releasable("abc STO", 0, hold=3) == "abc "

