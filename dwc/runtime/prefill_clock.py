"""What the host-memory tier saves, in seconds (docs/RUNTIME.md, "Host-memory KV tier").

The engine times its own steps that carry many prompt tokens (CUDA events on a GPU, read
when they have completed, so the host never waits; the wall clock on CPU) and keeps a
moving average of seconds per token of those steps. Each prompt token served from the
host tier instead of computed is worth that much prefill time, priced at the average
when it is counted (the first hits wait for the first timed step): the
`dwc_kv_host_prefill_seconds_saved` metric. The copy back is not subtracted (it runs
beside other work on the bus; its bytes are their own metric).
"""

from __future__ import annotations

import time
from collections import deque

import torch

MIN_PROMPT_TOKENS = 256   # steps with fewer prompt tokens are mostly decoding: not timed
SMOOTHING = 0.2           # weight of the newest timed step in the moving average


class PrefillClock:
    def __init__(self, gpu: bool):
        self.gpu = gpu
        self.min_tokens = MIN_PROMPT_TOKENS
        self.pending: deque = deque()      # (begin, end, tokens) of timed GPU steps
        self.seconds_per_token: float | None = None
        self.saved_seconds = 0.0
        self.priced_tokens = 0             # host-tier tokens already counted in saved_seconds

    def start(self, chunks) -> tuple | None:
        """Begin timing a step that carries at least `min_tokens` prompt tokens. Its
        time is shared by all its tokens (decode rows of a mixed step cost a GEMM row as
        a prompt token does)."""
        prompt_tokens = 0
        for c in chunks:
            prompt = len(c.seq.prompt_ids)
            if c.start < prompt:
                prompt_tokens += min(c.start + c.length, prompt) - c.start
        if prompt_tokens < self.min_tokens:
            return None
        tokens = sum(c.length for c in chunks)
        if not self.gpu:
            return time.perf_counter(), tokens
        begin = torch.cuda.Event(enable_timing=True)
        begin.record()
        return begin, tokens

    def stop(self, timing: tuple | None, hit_tokens: int) -> None:
        """End the step's timing (if it was timed); price the tier's new hit tokens."""
        if timing is not None:
            begin, tokens = timing
            if self.gpu:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self.pending.append((begin, end, tokens))
            else:
                self._observe(time.perf_counter() - begin, tokens)
        while self.pending and self.pending[0][1].query():
            begin, end, tokens = self.pending.popleft()
            self._observe(begin.elapsed_time(end) / 1000, tokens)
        if self.seconds_per_token is not None and hit_tokens > self.priced_tokens:
            self.saved_seconds += (hit_tokens - self.priced_tokens) * self.seconds_per_token
            self.priced_tokens = hit_tokens

    def _observe(self, seconds: float, tokens: int) -> None:
        rate = seconds / tokens
        old = self.seconds_per_token
        self.seconds_per_token = rate if old is None else old + SMOOTHING * (rate - old)
