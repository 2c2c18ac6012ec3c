"""What `dwc serve` answers when it will not take a request: 413 (body over the limit,
before parsing), 503 with Retry-After (the engine cannot admit work), and `dwc build`
refusing chat data that the tokenizer cannot render."""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

from starlette.testclient import TestClient

from dwc.serving.http_server import make_app
from dwc.runtime.async_engine import FAILING_STEPS, kv_full
from dwc.runtime.block_manager import BlockManager
from dwc.runtime.engine import Engine, EngineConfig
from dwc.runtime.scheduler import Scheduler
from dwc.runtime.sequence import SamplingParams, Sequence, Status
from tests.conftest import assert_clean_error, copy_checkpoint, dwc, write_buildfile


def test_a_body_over_the_limit_is_413_before_parsing(bundle, monkeypatch):
    import dwc.serving.http_server as http_server

    parsed = []  # what the server parses (its own json name, not the module everyone shares)
    monkeypatch.setattr(http_server, "json", SimpleNamespace(
        loads=lambda b: parsed.append(len(b)) or json.loads(b), dumps=json.dumps))
    app = make_app(Engine.from_bundle(bundle, EngineConfig(num_blocks=16)), "x",
                   max_body_bytes=1000)
    with TestClient(app) as client:
        big = {"prompt": "x" * 2000, "max_tokens": 1}
        r = client.post("/v1/completions", json=big)
        assert r.status_code == 413 and "1000 bytes" in r.json()["error"]["message"]
        chunked = client.post("/v1/completions", content=iter([json.dumps(big).encode()[:600]] * 2),
                              headers={"content-type": "application/json"})
        assert chunked.status_code == 413 and "content-length" not in chunked.request.headers
        assert parsed == []  # neither was parsed
        assert client.post("/v1/completions", json={"prompt": "import os",
                                                    "max_tokens": 1}).status_code == 200
        assert len(parsed) == 1


def test_a_failing_engine_answers_503_with_retry_after(bundle, monkeypatch):
    engine = Engine.from_bundle(bundle, EngineConfig(num_blocks=16))

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(engine.runner, "run", broken)
    with TestClient(make_app(engine, "x")) as client:
        body = {"prompt": "import os", "max_tokens": 2}
        for _ in range(FAILING_STEPS):
            assert client.post("/v1/completions", json=body).status_code == 500
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
        assert "steps failed" in r.json()["error"]["message"]
    with TestClient(make_app(Engine.from_bundle(bundle, EngineConfig(num_blocks=16)), "x")) as c:
        c.app.state.api.core.stop()  # the engine thread has ended: nothing can run
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 503 and "not running" in r.json()["error"]["message"]


def test_a_kv_cache_that_keeps_the_queue_out_answers_503(bundle, monkeypatch):
    """8 blocks of 16 tokens: a 100-token request holds 7 and grows to 8, so a 40-token one
    waits for blocks until it ends; a request arriving meanwhile is refused (with the
    blocked time lowered to 0 s; it is KV_WAIT_S), and one after it is served."""
    engine = Engine.from_bundle(bundle, EngineConfig(num_blocks=8, max_num_batched_tokens=128))
    real_run = engine.runner.run
    monkeypatch.setattr(engine.runner, "run", lambda *a: time.sleep(0.05) or real_run(*a))
    long = {"prompt": [5] * 100, "max_tokens": 26, "ignore_eos": True, "temperature": 0}
    with TestClient(make_app(engine, "x")) as client:
        client.app.state.api.core.kv_wait_s = 0.0
        first = threading.Thread(target=client.post, args=("/v1/completions",), kwargs={"json": long})
        first.start()
        while not engine.scheduler.running:
            time.sleep(0.01)
        second = threading.Thread(target=client.post, args=("/v1/completions",),
                                  kwargs={"json": {"prompt": [6] * 40, "max_tokens": 2}})
        second.start()
        deadline = time.time() + 30
        while client.app.state.api.core.kv_blocked is None and time.time() < deadline:
            time.sleep(0.01)
        r = client.post("/v1/completions", json={"prompt": "import os", "max_tokens": 1})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "KV cache is full" in r.json()["error"]["message"]
        first.join()
        second.join()
        ok = client.post("/v1/completions", json={"prompt": "import os", "max_tokens": 1})
        assert ok.status_code == 200


def test_kv_full_means_the_oldest_waiting_request_cannot_get_blocks():
    blocks = BlockManager(4, 16)
    scheduler = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=64)
    running = Sequence(list(range(50)), SamplingParams())
    blocks.grow(running, 50)  # 4 blocks: all of them
    running.status = Status.RUNNING
    assert kv_full(scheduler, blocks) is None  # nothing waits
    scheduler.running.append(running)
    scheduler.add(Sequence(list(range(20)), SamplingParams()))
    assert "KV cache is full (1 requests wait" in kv_full(scheduler, blocks)
    scheduler.finish(running, "stop")
    assert kv_full(scheduler, blocks) is None  # its blocks are back


def test_build_refuses_chat_data_without_a_chat_template(example, tmp_path):
    model = copy_checkpoint(example, tmp_path / "ckpt")
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    data = tmp_path / "chat.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "import os"}]}\n')
    bf = write_buildfile(tmp_path / "bf", example, model=str(model),
                         **{"calibration.data": str(data)})
    out = tmp_path / "out"
    result = dwc("build", bf, "--target", "cpu-bf16", "-o", out)
    assert_clean_error(result, 2, "calibration.data", "no chat template")
    assert not out.exists()
