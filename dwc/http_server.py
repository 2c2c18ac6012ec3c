"""`dwc serve`: the OpenAI-compatible HTTP API over the runtime (Starlette on uvicorn).

/v1/completions and /v1/chat/completions (both with SSE streaming), /v1/models, /health,
/metrics (Prometheus). Bad JSON, parameters or fields -> 400 with the reason, never a 500
(unknown fields are refused, as OpenAI does); a prompt longer than the context -> 400
naming the limit; a full queue -> 429; a client that disconnects has its sequence
aborted and its blocks freed. uvicorn drains in-flight requests on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

from jinja2.exceptions import TemplateError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dwc.errors import BadInput
from dwc.openai_request import check_fields, encodable, sampling_from
from dwc.runtime.async_engine import AsyncEngine, QueueFull, Request
from dwc.runtime.engine import Engine
from dwc.runtime.sequence import SamplingParams


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.waiting = Gauge("dwc_queue_depth", "requests waiting", registry=r)
        self.running = Gauge("dwc_running_sequences", "sequences running", registry=r)
        self.blocks_used = Gauge("dwc_kv_blocks_used", "KV cache blocks in use", registry=r)
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
        self.tpot = Histogram("dwc_time_per_output_token_seconds", "time per output token",
                              registry=r, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, 1))

    def observe_engine(self, engine: Engine) -> None:
        b = engine.blocks
        self.waiting.set(len(engine.scheduler.waiting))
        self.running.set(len(engine.scheduler.running))
        self.blocks_used.set(len(b.blocks) - b.num_free)
        self.prefix_hit_rate.set(b.hits / b.lookups if b.lookups else 0.0)
        spec = engine.speculation()
        if spec and spec["steps"]:
            self.drafted.set(spec["drafted"])
            self.accepted.set(spec["accepted"])
            self.acceptance.set(spec["acceptance_rate"] or 0.0)
            self.per_step.set(spec["mean_accepted_tokens"])


def releasable(text: str, sent: int, hold: int) -> str:
    """The prefix of `text` that can be streamed now: not the last `hold` characters (they
    may start a stop string), and not a trailing character whose bytes have not all
    arrived (decoded as U+FFFD until they have). Never shorter than what was sent."""
    ready = text[:max(sent, len(text) - hold)]
    while ready.endswith("\ufffd") and len(ready) > sent:
        ready = ready[:-1]
    return ready


def bad_request(message: str, status: int = 400) -> JSONResponse:
    kind = "invalid_request_error" if status == 400 else "server_busy"
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


class EngineFailed(Exception):
    """The engine's step failed while this request was in it."""


class ClientGone(Exception):
    """The client disconnected before its answer was complete."""


class Api:
    def __init__(self, engine: Engine, model_name: str, max_waiting: int = 256):
        self.engine = engine
        self.name = model_name
        self.metrics = Metrics()
        self.core = AsyncEngine(engine, max_waiting, self.metrics)
        self.tokenizer = engine.tokenizer

    async def completions(self, http: HttpRequest, chat: bool = False):
        try:
            body = json.loads(await http.body())
        except (ValueError, RecursionError):  # bad JSON or UTF-8; nesting past the stack
            return bad_request("body is not valid JSON")
        except ClientDisconnect:  # gone before its body arrived: nobody reads an answer
            return Response(status_code=499)
        if not isinstance(body, dict):
            return bad_request("body must be a JSON object")
        try:
            check_fields(body, chat)
            prompt = self._prompt(body, chat)
            params = sampling_from(body)
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            self.engine.check(ids, params)
        except BadInput as e:
            return bad_request(e.message)
        request = Request(ids, params, asyncio.get_running_loop())
        try:
            self.core.submit(request)
        except QueueFull as e:
            return bad_request(f"server busy: {e}", 429)
        if body.get("stream"):
            return StreamingResponse(self._stream(request, http, chat),
                                     media_type="text/event-stream")
        return await self._complete(request, http, chat)

    def _prompt(self, body: dict, chat: bool) -> str:
        if not chat:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise BadInput("prompt: expected a string")
            return encodable(prompt, "prompt")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in messages):
            raise BadInput("messages: expected a list of {role, content} objects")
        try:
            prompt = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                        add_generation_prompt=True)
        except TemplateError as e:  # the template refuses these messages (roles, order)
            raise BadInput(f"messages: the chat template refuses them: {e}") from None
        return encodable(prompt, "messages")

    async def _events(self, request: Request, http: HttpRequest):
        """Tokens as they come; aborts the sequence if the client goes away (checked at
        least once a second, also while tokens keep coming)."""
        checked = time.monotonic()
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(request.events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    kind = None
                if time.monotonic() - checked >= 1.0 or kind is None:
                    checked = time.monotonic()
                    if await http.is_disconnected():
                        raise ClientGone
                if kind is None:
                    continue
                if kind == "error":
                    raise EngineFailed(value)
                yield kind, value
                if kind == "done":
                    return
        except (asyncio.CancelledError, GeneratorExit, ClientGone):
            self.core.abort(request)
            raise

    def _text(self, ids: list[int], params: SamplingParams) -> str:
        text = self.tokenizer.decode([t for t in ids if t not in self.engine.eos_ids])
        cuts = [text.find(s) for s in params.stop if s in text]
        return text[:min(cuts)] if cuts else text

    async def _complete(self, request: Request, http: HttpRequest, chat: bool):
        ids, reason = [], None
        try:
            async for kind, value in self._events(request, http):
                if kind == "token":
                    ids.append(value)
                else:
                    reason = value
        except EngineFailed as e:
            return JSONResponse({"error": {"message": f"generation failed: {e}",
                                           "type": "server_error"}}, status_code=500)
        except ClientGone:
            return Response(status_code=499)  # nginx's "client closed request"
        self._observe_tpot(request, len(ids))
        text = self._text(ids, request.params)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                   "finish_reason": reason} if chat else
                  {"index": 0, "text": text, "finish_reason": reason})
        return JSONResponse(self._envelope(chat, choice) | {"usage": {
            "prompt_tokens": len(request.prompt_ids), "completion_tokens": len(ids),
            "total_tokens": len(request.prompt_ids) + len(ids)}})

    async def _stream(self, request: Request, http: HttpRequest, chat: bool):
        ids, sent = [], ""
        hold = max((len(s) for s in request.params.stop), default=1) - 1
        try:
            async for kind, value in self._events(request, http):
                if kind == "token":
                    ids.append(value)
                    ready = releasable(self._text(ids, request.params), len(sent), hold)
                else:
                    ready = self._text(ids, request.params)
                delta, sent = ready[len(sent):], ready
                reason = value if kind == "done" else None
                if delta or reason:
                    choice = ({"index": 0, "delta": {"content": delta}, "finish_reason": reason}
                              if chat else {"index": 0, "text": delta, "finish_reason": reason})
                    yield f"data: {json.dumps(self._envelope(chat, choice, chunk=True))}\n\n"
        except EngineFailed as e:
            error = {"error": {"message": f"generation failed: {e}", "type": "server_error"}}
            yield f"data: {json.dumps(error)}\n\n"
            return
        except ClientGone:
            return
        self._observe_tpot(request, len(ids))
        yield "data: [DONE]\n\n"

    def _observe_tpot(self, request: Request, n: int) -> None:
        if n > 1 and request.first_token_at:
            self.metrics.tpot.observe((time.perf_counter() - request.first_token_at) / (n - 1))

    def _envelope(self, chat: bool, choice: dict, chunk: bool = False) -> dict:
        kind = "chat.completion" + (".chunk" if chunk else "") if chat else "text_completion"
        return {"id": f"cmpl-{uuid.uuid4().hex[:16]}", "object": kind, "created": int(time.time()),
                "model": self.name, "choices": [choice]}

    async def models(self, _):
        return JSONResponse({"object": "list", "data": [{"id": self.name, "object": "model",
                                                         "owned_by": "dwc"}]})

    async def health(self, _):
        return JSONResponse({"status": "ok", "failed_steps": self.core.errors})

    async def prometheus(self, _):
        self.metrics.observe_engine(self.engine)
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def make_app(engine: Engine, model_name: str, max_waiting: int = 256) -> Starlette:
    api = Api(engine, model_name, max_waiting)

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
