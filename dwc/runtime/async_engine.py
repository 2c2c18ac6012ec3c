"""The engine behind an async server: one thread owns the engine and steps it; requests
come in and leave through thread-safe queues.

Only the engine thread touches the engine. `submit` hands it a request; each new token
is pushed to the request's asyncio queue with `call_soon_threadsafe`; `abort` (a client
that went away) is handled at the next step and frees the sequence's blocks.

Several sequences of one prompt (n > 1) are submitted as a group: the first is added at
once, the others when its prompt is in the KV cache (after its first token), so they
take its blocks from the prefix cache instead of computing the prompt again.
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
    followers: list = field(default_factory=list)  # its group's others, not added yet


class QueueFull(Exception):
    pass


FAILING_STEPS = 3      # consecutive failed steps after which new work is refused (503)
FAILING_RETRY_S = 10   # ... for this long after the last failure, then tried again
# New work is refused (503) once the oldest waiting request has been kept out by a full
# KV cache this long without a break: a queue blocked on memory for a moment is normal
# under load (preemption, sequences finishing), one blocked for seconds is saturation.
KV_WAIT_S = 10.0


def kv_full(scheduler, blocks) -> str | None:
    """Why new work cannot be admitted for want of KV blocks: sequences run, and the
    oldest waiting one's next chunk does not fit in the free blocks (a new request would
    only queue behind it). None when it fits or nothing waits."""
    try:
        head = scheduler.waiting[0]
    except IndexError:  # emptied by the engine thread meanwhile
        return None
    need = min(head.num_tokens - head.num_computed, scheduler.max_num_batched_tokens)
    if scheduler.running and not blocks.can_grow(head, head.num_computed + need):
        return f"the KV cache is full ({len(scheduler.waiting)} requests wait for blocks)"
    return None


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
        self.failing = 0                      # failed steps since the last one that ran
        self.failed_at = 0.0
        self.kv_wait_s = KV_WAIT_S
        self.kv_blocked: tuple[float, str] | None = None  # (since, why) the KV cache is full
        self.thread = threading.Thread(target=self._loop, name="dwc-engine", daemon=True)
        self.thread.start()

    def submit(self, request: Request) -> None:
        self.submit_groups([[request]])

    def submit_groups(self, groups: list[list[Request]]) -> None:
        """Queue every request of `groups` (each: one prompt's sequences) or none."""
        total = sum(len(g) for g in groups)
        with self.lock:
            if len(self.engine.scheduler.waiting) + self.arriving + total > self.max_waiting:
                raise QueueFull(f"{self.max_waiting} requests already wait")
            self.arriving += total
        for leader, *followers in groups:
            leader.followers = followers
            self.inbox.put(("add", leader))

    def unavailable(self) -> tuple[str, int] | None:
        """(why, seconds to wait) when the engine cannot admit work now, else None. Read
        from the server's thread without a lock: an estimate, as /metrics is."""
        if self.stopping or not self.thread.is_alive():
            return "the engine is not running", FAILING_RETRY_S
        if self.failing >= FAILING_STEPS and time.monotonic() - self.failed_at < FAILING_RETRY_S:
            return f"the engine's last {self.failing} steps failed", FAILING_RETRY_S
        blocked = self.kv_blocked
        if blocked and time.monotonic() - blocked[0] >= self.kv_wait_s:
            return f"{blocked[1]} for {time.monotonic() - blocked[0]:.0f} s", 1
        return None

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
                    self.kv_blocked = None  # nothing waits
                    continue
                finished = self.engine.step()
                self.failing = 0
                self._publish(finished)
                self._watch_kv()
            except Exception as e:  # noqa: BLE001  the thread must outlive any one batch
                self.failing += 1
                self.failed_at = time.monotonic()
                self._fail_all(e)
            if self.metrics:
                self.metrics.observe_engine(self.engine)

    def _watch_kv(self) -> None:
        """Note when the KV cache started keeping the queue out (unavailable reads it)."""
        full = kv_full(self.engine.scheduler, self.engine.blocks)
        if not full:
            self.kv_blocked = None
        elif self.kv_blocked is None:
            self.kv_blocked = (time.monotonic(), full)

    def _fail_all(self, error: Exception) -> None:
        """A step failed: end every live request with the error and free its blocks, so
        no client waits forever and the engine serves the next requests."""
        self.errors += 1
        for request in list(self.live.values()):
            self.engine.abort(request.seq)
            self._fail(request, f"{type(error).__name__}: {error}")
        self.live.clear()

    def _fail(self, request: Request, message: str) -> None:
        """End a request (and its group's sequences not added yet) with an error."""
        for r in [request, *request.followers]:
            r.loop.call_soon_threadsafe(r.events.put_nowait, ("error", message))
        self._drop_followers(request)

    def _drop_followers(self, request: Request) -> None:
        with self.lock:
            self.arriving -= len(request.followers)
        request.followers = []

    def _add(self, request: Request) -> None:
        try:
            request.seq = self.engine.add(request.prompt_ids, request.params)
        except Exception as e:  # noqa: BLE001  checked before, so a bug: its client hears it
            with self.lock:
                self.arriving -= 1
            self._fail(request, f"{type(e).__name__}: {e}")
            return
        with self.lock:  # after: now in the scheduler's waiting queue
            self.arriving -= 1
        self.live[request.seq.id] = request  # added first: a failure reaches it

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.05) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, request = item
            if kind == "add":
                self._add(request)
            elif request.seq is not None and request.seq.id in self.live:
                self.engine.abort(request.seq)
                del self.live[request.seq.id]
                self._drop_followers(request)
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
        for request in [r for r in self.live.values() if r.followers and r.seq.output_ids]:
            followers, request.followers = request.followers, []
            for follower in followers:  # its prompt's blocks are sealed: they share them
                self._add(follower)
        for seq in finished:
            request = self.live.pop(seq.id, None)
            if request is not None:
                request.loop.call_soon_threadsafe(request.events.put_nowait,
                                                  ("done", seq.finish_reason))
