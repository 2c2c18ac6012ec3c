"""The soak harness (issue 10) around dwc.perf.loadtest: `serving` runs `dwc serve`'s app (the
real uvicorn server) on a loopback port in a thread of this process, so `soak` can read
the engine's block manager, the live sequences and the resident memory while the load
runs; `soak_checks` says which of the soak's properties held. Used by
tests/reliability/test_soak.py and benchmarks/soak_cpu.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

from dwc.perf.loadtest import DISCONNECTS, VALID, make_cases, run_load


@contextlib.contextmanager
def serving(engine, max_waiting: int = 256, model_name: str = "soak"):
    """`dwc serve`'s app on a free loopback port, in a thread; yields (url, Api)."""
    import uvicorn

    from dwc.serving.http_server import make_app

    app = make_app(engine, model_name, max_waiting=max_waiting)
    # log_config=None: uvicorn leaves logging alone, so server_errors() keeps its handler.
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not (server.started and server.servers) and time.time() < deadline:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", app.state.api
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@contextlib.contextmanager
def server_errors():
    """Yields the list of what uvicorn and asyncio log as errors meanwhile (an exception
    in the app that no client saw, such as one after a client went away, is still one)."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage().splitlines()[0] + (
                f": {record.exc_info[0].__name__}" if record.exc_info else ""))

    handler = Collect(logging.ERROR)
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "asyncio")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield records
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def rss_bytes() -> int:
    """This process's resident memory (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def drained(engine, api, timeout: float = 30) -> dict:
    """Wait for the engine to go idle (aborts are handled at its next step); its state."""
    deadline = time.time() + timeout
    core = api.core
    while time.time() < deadline and (engine.has_work() or core.live or not core.inbox.empty()):
        time.sleep(0.05)
    return {"free_blocks": engine.blocks.num_free, "running": len(engine.scheduler.running),
            "waiting": len(engine.scheduler.waiting), "live_requests": len(core.live)}


def live_objects() -> dict:
    """Sequences and requests still alive (after a collection): none should outlive a run."""
    import gc

    from dwc.runtime.async_engine import Request
    from dwc.runtime.sequence import Sequence

    gc.collect()
    objects = gc.get_objects()
    return {"sequences": sum(type(o) is Sequence for o in objects),
            "requests": sum(type(o) is Request for o in objects)}


def soak(engine, requests: int, concurrency: int, max_tokens: int, seed: int = 0,
         warmup: float = 0.2, max_waiting: int = 256, samples: int = 10) -> dict:
    """The soak: `requests` drawn by make_cases at `concurrency`; the first `warmup`
    fraction warms the process up before the first memory reading. The figures."""
    limit = min(engine.runner.max_context, len(engine.blocks.blocks) * engine.blocks.block_size)
    cases = make_cases(requests, seed, max_tokens, limit)
    start, objects = engine.blocks.num_free, live_objects()
    preempted = engine.scheduler.preemptions
    began = time.perf_counter()
    with server_errors() as errors, serving(engine, max_waiting) as (url, api):
        w = int(len(cases) * warmup)
        tally = run_load(url, cases[:w], concurrency)
        drained(engine, api)
        rss = [(w, rss_bytes())]
        every = max(1, (len(cases) - w) // samples)
        tally = tally.merge(run_load(url, cases[w:], concurrency, on_done=lambda k: (
            k % every == 0 and rss.append((w + k, rss_bytes())))))
        end = drained(engine, api)
        rss.append((len(cases), rss_bytes()))
    seconds = time.perf_counter() - began
    sent = tally.sent
    return {
        "requests": len(cases), "concurrency": concurrency, "max_tokens": max_tokens,
        "seconds": round(seconds, 1), "requests_per_s": round(len(cases) / seconds, 1),
        "valid": {k: sent[k] for k in VALID}, "answered": {k: tally.answered[k] for k in VALID},
        "disconnects": {k: sent[k] for k in DISCONNECTS},
        "answered_before_disconnect": {k: tally.answered[k] for k in DISCONNECTS},
        "malformed": sum(v for k, v in sent.items() if k.startswith("malformed")),
        "malformed_rejected_4xx": sum(tally.rejected.values()),
        "malformed_cases": {k.split(":")[1]: v for k, v in sorted(sent.items())
                            if k.startswith("malformed")},
        "probes": sent["probe"], "busy_429_503": tally.busy,
        "preemptions": engine.scheduler.preemptions - preempted,
        "blocks": {"total": len(engine.blocks.blocks), "free_at_start": start,
                   "free_at_end": end["free_blocks"], "leaked": start - end["free_blocks"]},
        "left_in_engine": {k: end[k] for k in ("running", "waiting", "live_requests")},
        "objects_left": {k: v - objects[k] for k, v in live_objects().items()},
        "rss_mib": [(n, round(b / 2 ** 20, 1)) for n, b in rss],
        "rss_growth_mib": round((rss[-1][1] - rss[0][1]) / 2 ** 20, 1),
        "failures": len(tally.failures), "failure_examples": tally.failures[:20],
        "server_errors": len(errors), "server_error_examples": errors[:20],
    }


def soak_checks(report: dict, rss_growth_mib: float) -> dict:
    """Each check of a soak report, True when it held."""
    blocks = report["blocks"]
    return {
        "no_failed_request": report["failures"] == 0,
        "no_error_logged_by_the_server": report["server_errors"] == 0,
        "every_valid_request_answered": report["answered"] == report["valid"],
        "no_busy_answer_under_the_queue_limit": report["busy_429_503"] == 0,
        "every_malformed_request_4xx": report["malformed_rejected_4xx"] == report["malformed"],
        "no_block_leaked": blocks["leaked"] == 0 and blocks["free_at_end"] == blocks["total"],
        "engine_idle_after": not any(report["left_in_engine"].values()),
        "no_sequence_or_request_left": not any(report["objects_left"].values()),
        f"rss_growth_at_most_{rss_growth_mib:g}_mib": report["rss_growth_mib"] <= rss_growth_mib,
    }
