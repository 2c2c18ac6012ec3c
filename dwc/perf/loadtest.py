"""A load driver for an OpenAI-style server such as `dwc serve` (issue 10's soak; the
harness around it, which also watches the engine, is dwc.perf.soak).

`make_cases` draws a mix of requests: completions and chat, streamed and not, clients
that go away mid-stream or mid-request, malformed requests and probes of /health,
/metrics and /v1/models. `run_load` sends them at a fixed concurrency and checks every
answer: a valid request gets 200 with a well-formed body (a stream: JSON chunks, one
finish_reason, then [DONE]), a malformed one a 4xx with a JSON error, never a 5xx.
`burst` overfills the queue and checks the 429s and the recovery.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from dataclasses import dataclass, field

import httpx

VALID = ("complete", "complete_stream", "chat", "chat_stream")
DISCONNECTS = ("drop_stream", "cancel")
WEIGHTS = {"complete": 18, "complete_stream": 18, "chat": 14, "chat_stream": 14,
           "drop_stream": 8, "cancel": 8, "malformed": 16, "probe": 4}
WORDS = ("def", "class", "import", "return", "self", "for", "in", "range", "if", "else",
         "print", "os", "path", "join", "value", "list", "dict", "None", "True", "(", ")",
         ":", "=", "+", "\n    ", "é", "世界", "😀")
PREFIXES = ("import os\nimport sys\n\ndef main():\n", "class Parser:\n    def __init__(self",
            "for i in range(10):\n", "")  # shared prefixes exercise the prefix cache


@dataclass
class Case:
    kind: str                 # a VALID or DISCONNECTS kind, "malformed:<what>" or "probe"
    path: str
    body: bytes | None = None  # None: a GET
    max_tokens: int = 0
    stream: bool = False
    drop_after: float = 0      # drop_stream: chunks read before closing; cancel: seconds


@dataclass
class Tally:
    sent: Counter = field(default_factory=Counter)       # by kind
    answered: Counter = field(default_factory=Counter)   # checked 200s, by kind
    rejected: Counter = field(default_factory=Counter)   # 4xx with a JSON error, by kind
    busy: int = 0                                        # 429 / 503
    failures: list = field(default_factory=list)         # what was wrong, per request

    def fail(self, case: Case, message: str) -> None:
        self.failures.append(f"{case.kind} {case.path}: {message}"[:400])

    def merge(self, other: "Tally") -> "Tally":
        return Tally(self.sent + other.sent, self.answered + other.answered,
                     self.rejected + other.rejected, self.busy + other.busy,
                     self.failures + other.failures)


def _text(rng: random.Random, low: int, high: int) -> str:
    return rng.choice(PREFIXES) + " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def _valid(kind: str, rng: random.Random, max_tokens: int) -> Case:
    chat, stream = kind.startswith("chat"), kind.endswith("stream")
    n = rng.randint(1, max_tokens)
    body = {"max_tokens": n, "stream": stream, "temperature": rng.choice([0, 0.7, 1.0]),
            "seed": rng.randrange(1 << 30), "ignore_eos": rng.random() < 0.5}
    if rng.random() < 0.2:
        body["stop"] = rng.choice(["\n\n", ["):", "return"]])
    if chat:
        body["messages"] = [{"role": "user", "content": _text(rng, 1, 12)}]
        if rng.random() < 0.3:
            body["messages"].insert(0, {"role": "system", "content": "You write Python."})
    else:
        body["prompt"] = _text(rng, 1, 24)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    return Case(kind, path, json.dumps(body).encode(), n, stream)


def _malformed(rng: random.Random, limit: int) -> Case:
    """One of the ways a request can be wrong; each must get a 4xx with a JSON error."""
    ok = {"prompt": "import os", "max_tokens": 4}
    variants = {
        "empty_body": b"", "bad_json": b'{"prompt": "x", ', "not_object": b'["x", 1]',
        "bad_utf8": b'{"prompt": "\xff\xfe"}', "lone_surrogate": b'{"prompt": "a\\ud800b"}',
        "deep_nesting": b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "prompt_type": {"prompt": 123}, "max_tokens_type": {**ok, "max_tokens": "8"},
        "negative_max_tokens": {**ok, "max_tokens": -5}, "zero_max_tokens": {**ok, "max_tokens": 0},
        "temperature_type": {**ok, "temperature": "hot"}, "stop_type": {**ok, "stop": [1, 2]},
        "unknown_field": {**ok, "beam_width": 4}, "zero_n": {**ok, "n": 0},
        "empty_prompt": {**ok, "prompt": ""},
        "oversized_prompt": {**ok, "prompt": "x " * (2 * limit)},
        "oversized_max_tokens": {**ok, "max_tokens": limit},
        "messages_type": {"messages": "hi"}, "message_missing_content": {"messages": [{"role": "user"}]},
        "message_content_type": {"messages": [{"role": "user", "content": 5}]},
    }
    what = rng.choice(sorted(variants))
    body = variants[what]
    chat = what.startswith("message")
    body = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Case(f"malformed:{what}", "/v1/chat/completions" if chat else "/v1/completions", body)


def make_cases(n: int, seed: int, max_tokens: int, limit: int) -> list[Case]:
    """`n` requests drawn with WEIGHTS; `max_tokens` caps valid requests' lengths; `limit`
    is the server's context limit in tokens (malformed requests go past it)."""
    rng = random.Random(seed)
    kinds = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()), k=n)
    cases = []
    for kind in kinds:
        if kind in VALID:
            cases.append(_valid(kind, rng, max_tokens))
        elif kind in DISCONNECTS:
            case = _valid(rng.choice(VALID[1::2] if kind == "drop_stream" else VALID[0::2]),
                          rng, max_tokens)
            case.kind, case.max_tokens = kind, max_tokens
            case.body = json.dumps({**json.loads(case.body), "max_tokens": max_tokens,
                                    "ignore_eos": True}).encode()  # long enough to cut
            case.drop_after = rng.randint(1, 3) if kind == "drop_stream" else rng.uniform(0, 0.5)
            cases.append(case)
        elif kind == "malformed":
            cases.append(_malformed(rng, limit))
        else:
            cases.append(Case("probe", rng.choice(["/health", "/metrics", "/v1/models"])))
    return cases


def _check_body(case: Case, body: dict) -> str | None:
    choice = body["choices"][0]
    text = choice["message"]["content"] if case.path.endswith("chat/completions") else choice["text"]
    if not isinstance(text, str) or choice["finish_reason"] not in ("stop", "length"):
        return f"bad choice {choice}"
    if not 1 <= body["usage"]["completion_tokens"] <= case.max_tokens:
        return f"completion_tokens {body['usage']['completion_tokens']} of {case.max_tokens}"
    return None


def _check_stream(case: Case, lines: list[str]) -> str | None:
    data = [line[6:] for line in lines if line.startswith("data: ")]
    if not data or data[-1] != "[DONE]":
        return f"stream did not end with [DONE]: {data[-2:]}"
    chunks = [json.loads(d) for d in data[:-1]]
    reasons = [c["choices"][0]["finish_reason"] for c in chunks]
    if reasons[-1] not in ("stop", "length") or any(reasons[:-1]):
        return f"finish reasons {reasons}"
    key = "delta" if case.path.endswith("chat/completions") else "text"
    if not all(isinstance(c["choices"][0][key], (str, dict)) for c in chunks):
        return "a chunk without text"
    return None


async def _send(client: httpx.AsyncClient, case: Case, tally: Tally) -> None:
    if case.body is None:
        r = await client.get(case.path)
        if r.status_code != 200:
            tally.fail(case, f"status {r.status_code}")
        else:
            tally.answered[case.kind] += 1
        return
    if case.kind == "cancel":
        try:
            r = await asyncio.wait_for(client.post(case.path, content=case.body), case.drop_after)
        except asyncio.TimeoutError:
            return  # the client went away mid-request
        return _judge(case, r, json_body=True, tally=tally, lines=None)
    async with client.stream("POST", case.path, content=case.body) as r:
        if not (case.stream and r.status_code == 200):
            await r.aread()
            return _judge(case, r, json_body=True, tally=tally, lines=None)
        lines = []
        async for line in r.aiter_lines():
            lines.append(line)
            if case.kind == "drop_stream" and len(lines) >= case.drop_after:
                return  # closes the connection mid-stream
        return _judge(case, r, json_body=False, tally=tally, lines=lines)


def _judge(case: Case, r: httpx.Response, json_body: bool, tally: Tally, lines) -> None:
    try:
        if r.status_code in (429, 503):  # the queue is full: a JSON error, then try later
            if not isinstance(r.json()["error"]["message"], str):
                raise TypeError("error.message is not a string")
            tally.busy += 1
            return
        if case.kind.startswith("malformed"):
            message = r.json()["error"]["message"]
            if 400 <= r.status_code < 500 and isinstance(message, str):
                tally.rejected[case.kind] += 1
            else:
                tally.fail(case, f"status {r.status_code}: {message}")
            return
        if r.status_code != 200:
            return tally.fail(case, f"status {r.status_code}: {r.text[:200]}")
        problem = _check_body(case, r.json()) if json_body else _check_stream(case, lines)
    except (ValueError, KeyError, IndexError, TypeError) as e:
        problem = f"malformed answer ({type(e).__name__}: {e}): {r.text[:200]}"
    if problem:
        tally.fail(case, problem)
    else:
        tally.answered[case.kind] += 1


async def _run(url: str, cases: list[Case], concurrency: int, timeout: float,
               on_done=None) -> Tally:
    tally, done = Tally(), [0]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        sem = asyncio.Semaphore(concurrency)

        async def one(case: Case):
            async with sem:
                tally.sent[case.kind] += 1
                try:
                    await asyncio.wait_for(_send(client, case, tally), timeout)
                except Exception as e:  # noqa: BLE001  a failure of this request, recorded
                    tally.fail(case, f"{type(e).__name__}: {e}")
                done[0] += 1
                if on_done:
                    on_done(done[0])
        await asyncio.gather(*(one(c) for c in cases))
    return tally


def run_load(url: str, cases: list[Case], concurrency: int, timeout: float = 120,
             on_done=None) -> Tally:
    """Send `cases` at `concurrency`; `on_done(count)` after each answer."""
    return asyncio.run(_run(url, cases, concurrency, timeout, on_done))


def burst(url: str, n: int, max_tokens: int, recover: int = 8) -> dict:
    """`n` long requests at once (more than the queue holds), then `recover` more once the
    burst is over: counts of each outcome; `failures` lists what was wrong."""
    body = json.dumps({"prompt": "import os", "max_tokens": max_tokens, "ignore_eos": True})
    first = run_load(url, [Case("complete", "/v1/completions", body.encode(), max_tokens)] * n, n)
    small = json.dumps({"prompt": "def f(x):", "max_tokens": 4}).encode()
    after = run_load(url, [Case("complete", "/v1/completions", small, 4)] * recover, 4)
    return {"burst": n, "served": first.answered["complete"], "busy": first.busy,
            "recovered": after.answered["complete"], "recover": recover,
            "failures": first.failures + after.failures
            + ([f"{after.busy} busy answers after the burst"] if after.busy else [])}


def burst_checks(burst_report: dict) -> dict:
    """Each check of a queue-limit burst (see `burst`), True when it held."""
    b = burst_report
    return {"burst_answers_429_or_serves": not b["failures"] and b["busy"] > 0 < b["served"]
            and b["served"] + b["busy"] == b["burst"],
            "serves_after_the_burst": b["recovered"] == b["recover"]}
