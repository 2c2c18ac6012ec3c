"""The engine behind an async server: one thread owns the engine and steps it; requests
come in and leave through thread-safe queues.

Only the engine thread touches the engine. `submit` hands it a request; each new token
is pushed to the request's asyncio queue with `call_soon_threadsafe`; `abort` (a client
that went away) is handled at the next step and frees the sequence's blocks.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

from dwc.runtime.engine import Engine
from dwc.runtime.sequence import SamplingParams, Sequence


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # (token|done|error, value)
    arrived: float = field(default_factory=time.perf_counter)
    seq: Sequence | None = None
    sent: int = 0                       # tokens already pushed to `events`
    first_token_at: float | None = None


class QueueFull(Exception):
    pass


class AsyncEngine:
    def __init__(self, engine: Engine, max_waiting: int = 256, metrics=None):
        self.engine = engine
        self.max_waiting = max_waiting
        self.metrics = metrics
        self.inbox: queue.Queue = queue.Queue()
        self.arriving = 0                     # "add"s in the inbox (aborts do not queue)
        self.lock = threading.Lock()
        self.live: dict[int, Request] = {}
        self.stopping = False
        self.errors = 0                       # failed steps, for /health
        self.thread = threading.Thread(target=self._loop, name="dwc-engine", daemon=True)
        self.thread.start()

    def submit(self, request: Request) -> None:
        with self.lock:
            if len(self.engine.scheduler.waiting) + self.arriving >= self.max_waiting:
                raise QueueFull(f"{self.max_waiting} requests already wait")
            self.arriving += 1
        self.inbox.put(("add", request))

    def abort(self, request: Request) -> None:
        self.inbox.put(("abort", request))

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(timeout=10)

    # -- the engine thread ----------------------------------------------------------------

    def _loop(self) -> None:
        while not self.stopping:
            try:
                self._drain_inbox(block=not self.engine.has_work())
                if not self.engine.has_work():
                    continue
                finished = self.engine.step()
                self._publish(finished)
            except Exception as e:  # noqa: BLE001  the thread must outlive any one batch
                self._fail_all(e)
            if self.metrics:
                self.metrics.observe_engine(self.engine)

    def _fail_all(self, error: Exception) -> None:
        """A step failed: end every live request with the error and free its blocks, so
        no client waits forever and the engine serves the next requests."""
        self.errors += 1
        for request in list(self.live.values()):
            self.engine.abort(request.seq)
            request.loop.call_soon_threadsafe(request.events.put_nowait,
                                              ("error", f"{type(error).__name__}: {error}"))
        self.live.clear()

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.05) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, request = item
            if kind == "add":
                request.seq = self.engine.add(request.prompt_ids, request.params)
                with self.lock:  # after: now in the scheduler's waiting queue
                    self.arriving -= 1
                self.live[request.seq.id] = request  # added first: a failure reaches it
            elif request.seq is not None and request.seq.id in self.live:
                self.engine.abort(request.seq)
                del self.live[request.seq.id]
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _publish(self, finished: list[Sequence]) -> None:
        for request in self.live.values():
            new = request.seq.output_ids[request.sent:]
            request.sent += len(new)
            for token in new:
                if request.first_token_at is None:
                    request.first_token_at = time.perf_counter()
                    if self.metrics:
                        self.metrics.ttft.observe(request.first_token_at - request.arrived)
                request.loop.call_soon_threadsafe(request.events.put_nowait, ("token", token))
        for seq in finished:
            request = self.live.pop(seq.id, None)
            if request is not None:
                request.loop.call_soon_threadsafe(request.events.put_nowait,
                                                  ("done", seq.finish_reason))
