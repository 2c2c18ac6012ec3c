"""`dwc serve`: the OpenAI-compatible HTTP API over the runtime (Starlette on uvicorn).

/v1/completions and /v1/chat/completions (both with SSE streaming; n, best_of, echo,
logprobs), /v1/models, /health, /metrics (Prometheus). Answers: bad JSON, parameters or
fields -> 400 with the reason, never a 500 (unknown fields are refused, as OpenAI does);
a prompt longer than the context -> 400 naming the limit; chat on a tokenizer without a
chat template -> 400; a body over the size limit -> 413 before it is parsed; a full
queue -> 429; an engine that cannot admit work (its KV cache full with requests already
waiting for blocks, its steps failing, or stopped) -> 503 with Retry-After. A client that
disconnects has its sequences aborted and their blocks freed. uvicorn drains in-flight
requests on SIGTERM. The answers themselves are built in http_answer.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

from jinja2.exceptions import TemplateError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, \
    generate_latest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dwc.errors import BadInput
from dwc.serving.http_answer import Answer, ClientGone, EngineFailed, Prompt, Tagged, releasable  # noqa: F401
from dwc.serving.openai_request import (check_fields, choices_from, encodable, per_choice, prompts_from,
                                sampling_from)
from dwc.runtime.async_engine import AsyncEngine, QueueFull, Request
from dwc.runtime.engine import Engine
from dwc.runtime.sequence import SamplingParams, cut_at_stop

# 4 MiB: a full 128k-token context as JSON token ids is about 1 MiB; past this a body is
# refused (413) before it is read into memory and parsed.
MAX_BODY_BYTES = 4 << 20


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.waiting = Gauge("dwc_queue_depth", "requests waiting", registry=r)
        self.running = Gauge("dwc_running_sequences", "sequences running", registry=r)
        self.blocks_used = Gauge("dwc_kv_blocks_used", "KV cache blocks in use", registry=r)
        self.blocks_total = Gauge("dwc_kv_blocks_total", "KV cache blocks", registry=r)
        # Exported as dwc_output_tokens_total: with the target's $/hour, $ per million
        # tokens (the Grafana dashboard in a GPU bundle's serve/, docs/DEPLOY.md).
        self.output_tokens = Counter("dwc_output_tokens", "tokens generated, finished choices",
                                     registry=r)
        self.prefix_hit_rate = Gauge("dwc_prefix_cache_hit_rate",
                                     "prompt tokens served from the prefix cache", registry=r)
        self.ttft = Histogram("dwc_time_to_first_token_seconds", "time to first token",
                              registry=r, buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.drafted = Gauge("dwc_spec_draft_tokens", "draft tokens proposed", registry=r)
        self.accepted = Gauge("dwc_spec_accepted_tokens", "draft tokens the target accepted",
                              registry=r)
        self.acceptance = Gauge("dwc_spec_acceptance_rate", "accepted / proposed draft tokens",
                                registry=r)
        self.per_step = Gauge("dwc_spec_tokens_per_step",
                              "mean tokens emitted per verification step", registry=r)
        # The host-memory KV tier (runtime/host_tier.py); zero without one.
        self.host_hits = Gauge("dwc_kv_host_hit_tokens", "prompt tokens served from the host "
                               "tier (prefill not recomputed)", registry=r)
        self.host_blocks = Gauge("dwc_kv_host_blocks", "blocks held in the host tier", registry=r)
        self.host_bytes = Gauge("dwc_kv_host_bytes_moved", "bytes copied to and from the host "
                                "tier", ["direction"], registry=r)
        self.host_saved = Gauge("dwc_kv_host_prefill_seconds_saved", "prefill time the host "
                                "tier's tokens would have cost (the engine's measured seconds "
                                "per prompt token)", registry=r)
        self.tpot = Histogram("dwc_time_per_output_token_seconds", "time per output token",
                              registry=r, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, 1))

    def observe_engine(self, engine: Engine) -> None:
        b = engine.blocks
        self.waiting.set(len(engine.scheduler.waiting))
        self.running.set(len(engine.scheduler.running))
        self.blocks_used.set(len(b.blocks) - b.num_free)
        self.blocks_total.set(len(b.blocks))
        self.prefix_hit_rate.set(b.hits / b.lookups if b.lookups else 0.0)
        if b.tier is not None:
            t = b.tier.stats
            self.host_hits.set(t.hit_tokens)
            self.host_blocks.set(len(b.tier))
            self.host_bytes.labels("to_host").set(t.bytes_out)
            self.host_bytes.labels("to_device").set(t.bytes_in)
            self.host_saved.set(engine.prefill_clock.saved_seconds)
        spec = engine.speculation()
        if spec and spec["steps"]:
            self.drafted.set(spec["drafted"])
            self.accepted.set(spec["accepted"])
            self.acceptance.set(spec["acceptance_rate"] or 0.0)
            self.per_step.set(spec["mean_accepted_tokens"])


def bad_request(message: str, status: int = 400, retry_after: int | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 413: "invalid_request_error"}.get(status, "server_busy")
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status,
                        headers=headers)


class BodyTooLarge(Exception):
    pass


class Api:
    def __init__(self, engine: Engine, model_name: str, max_waiting: int = 256,
                 max_body_bytes: int = MAX_BODY_BYTES):
        self.engine = engine
        self.name = model_name
        self.metrics = Metrics()
        self.core = AsyncEngine(engine, max_waiting, self.metrics)
        self.tokenizer = engine.tokenizer
        self.max_body_bytes = max_body_bytes
        self.vocab = int(engine.runner.hf_model.config.vocab_size)

    async def completions(self, http: HttpRequest, chat: bool = False):
        try:
            body = json.loads(await self._body(http))
        except BodyTooLarge:
            return bad_request(f"request body over the limit of {self.max_body_bytes} bytes "
                               "(dwc serve --max-body-bytes)", 413)
        except (ValueError, RecursionError):  # bad JSON or UTF-8; nesting past the stack
            return bad_request("body is not valid JSON")
        except ClientDisconnect:  # gone before its body arrived: nobody reads an answer
            return Response(status_code=499)
        if not isinstance(body, dict):
            return bad_request("body must be a JSON object")
        try:
            check_fields(body, chat)
            choices = choices_from(body, chat)
            params = sampling_from(body, choices)
            prompts = self._prompts(body, chat)
            for p in prompts:
                self.engine.check(p.ids, params)
        except BadInput as e:
            return bad_request(e.message)
        busy = self.core.unavailable()  # after the checks: a wrong request is 400 anyway
        if busy:
            return bad_request(f"server unavailable: {busy[0]}", 503, retry_after=busy[1])
        queue, loop = asyncio.Queue(), asyncio.get_running_loop()
        groups = [[Request(p.ids, sp, loop, events=Tagged(queue, i * choices.best_of + j))
                   for j, sp in enumerate(per_choice(params, choices))] for i, p in enumerate(prompts)]
        try:
            self.core.submit_groups(groups)
        except QueueFull as e:
            return bad_request(f"server busy: {e}", 429)
        answer = Answer(self, prompts, groups, choices, chat, queue)
        if choices.stream:
            return StreamingResponse(answer.stream(http), media_type="text/event-stream")
        try:
            return JSONResponse(await answer.complete(http))
        except EngineFailed as e:
            return JSONResponse({"error": {"message": f"generation failed: {e}",
                                           "type": "server_error"}}, status_code=500)
        except ClientGone:
            return Response(status_code=499)  # nginx's "client closed request"

    async def _body(self, http: HttpRequest) -> bytes:
        """The body, refused past the size limit before it is parsed: by its declared
        length, else (chunked) as soon as the bytes read pass it."""
        declared = http.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise BodyTooLarge
        parts, size = [], 0
        async for part in http.stream():
            size += len(part)
            if size > self.max_body_bytes:
                raise BodyTooLarge
            parts.append(part)
        return b"".join(parts)

    def _prompts(self, body: dict, chat: bool) -> list[Prompt]:
        if chat:
            text = self._chat_prompt(body)
            return [Prompt(self.tokenizer(text, add_special_tokens=False)["input_ids"], text)]
        out = []
        for i, p in enumerate(prompts_from(body)):
            if isinstance(p, str):
                out.append(Prompt(self.tokenizer(p, add_special_tokens=False)["input_ids"], p))
                continue
            bad = next((t for t in p if not 0 <= t < self.vocab), None)
            if bad is not None:  # an id past the embedding would fail the whole batch's step
                raise BadInput(f"prompt: token id {bad} is outside the vocabulary "
                               f"(0..{self.vocab - 1})")
            out.append(Prompt(p, self.tokenizer.decode(p)))
        return out

    def _chat_prompt(self, body: dict) -> str:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in messages):
            raise BadInput("messages: expected a list of {role, content} objects")
        if not getattr(self.tokenizer, "chat_template", None):
            # transformers raises ValueError here; vLLM answers 400 as well.
            raise BadInput("this model's tokenizer has no chat template: chat completions "
                           "are not available (use /v1/completions)")
        try:
            prompt = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                        add_generation_prompt=True)
        except TemplateError as e:  # the template refuses these messages (roles, order)
            raise BadInput(f"messages: the chat template refuses them: {e}") from None
        return encodable(prompt, "messages")

    def text(self, ids: list[int], params: SamplingParams) -> str:
        return cut_at_stop(self.tokenizer.decode([t for t in ids if t not in self.engine.eos_ids]),
                           params.stop)

    def observe_tpot(self, request: Request, n: int) -> None:
        """A finished choice of n tokens: its time per output token, and its tokens."""
        self.metrics.output_tokens.inc(n)
        if n > 1 and request.first_token_at:
            self.metrics.tpot.observe((time.perf_counter() - request.first_token_at) / (n - 1))

    async def models(self, _):
        return JSONResponse({"object": "list", "data": [{"id": self.name, "object": "model",
                                                         "owned_by": "dwc"}]})

    async def health(self, _):
        return JSONResponse({"status": "ok", "failed_steps": self.core.errors})

    async def prometheus(self, _):
        self.metrics.observe_engine(self.engine)
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def make_app(engine: Engine, model_name: str, max_waiting: int = 256,
             max_body_bytes: int = MAX_BODY_BYTES) -> Starlette:
    api = Api(engine, model_name, max_waiting, max_body_bytes)

    async def chat(http):
        return await api.completions(http, chat=True)

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        api.core.stop()

    app = Starlette(routes=[
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/models", api.models), Route("/health", api.health),
        Route("/metrics", api.prometheus),
    ], lifespan=lifespan)
    app.state.api = api
    return app
