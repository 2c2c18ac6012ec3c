"""Asynchronous scheduling: the host prepares step n+1 while the GPU runs step n.

A synchronous engine copies each step's sampled tokens to the host before it schedules
the next step, so the GPU idles while Python schedules, builds the batch and retires
sequences (3.3 of 8.5 ms a step at batch 128 for the 8B shape). Here a step of greedy
requests samples on the device (argmax) and starts copying the ids to pinned host
memory; the engine schedules and launches the next step at once, feeding each sequence's
pending token to it from the device tensor (`Feed`), and only then waits for the copy.

The bookkeeping (docs/RUNTIME.md, "Asynchronous scheduling"):
- a sampled token is *pending* until its step is collected: `Sequence.num_pending`
  counts it in the sequence's length (so it gets a position and a cache slot), and
  `Chunk.token_ids` shows it as PENDING;
- a sequence whose pending token ends it (EOS, a stop string) has already been scheduled
  once more: that row's result is dropped, and its blocks are freed after the launch
  that writes them, which the GPU runs first (one stream keeps the order);
- blocks are sealed into the prefix cache only up to tokens whose ids are known.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dwc.runtime.scheduler import Chunk
from dwc.runtime.sequence import Sequence


@dataclass
class Feed:
    """Where a step's pending input tokens come from: token rows `dst` of the step take
    the ids at rows `src` of `tokens` (the step in flight's samples, on the device)."""

    dst: list[int]
    src: list[int]
    tokens: torch.Tensor

    def apply(self, ids: torch.Tensor) -> None:
        """Write the pending ids into a step's input ids (device ops, no sync)."""
        dev = ids.device
        ids[to_device(self.dst, dev)] = self.tokens[to_device(self.src, dev)]


@dataclass
class InFlight:
    """A launched step whose sampled tokens are still on their way to the host."""

    seqs: list[Sequence]     # the sequence of each sampled row
    tokens: torch.Tensor     # [rows] long, on the device
    host: torch.Tensor       # [rows] their host copy (pinned on a GPU), valid after `event`
    event: object            # torch.cuda.Event; None on the CPU (the copy is done)

    @classmethod
    def start(cls, tokens: torch.Tensor, seqs: list[Sequence]) -> "InFlight":
        if tokens.device.type != "cuda":
            return cls(seqs, tokens, tokens, None)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return cls(seqs, tokens, host, event)

    def wait(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()

    def feed(self, chunks: list[Chunk]) -> Feed | None:
        """The Feed of a step whose chunks read this step's pending tokens."""
        rows = {seq.id: i for i, seq in enumerate(self.seqs)}
        dst, src, offset = [], [], 0
        for c in chunks:
            seq = c.seq
            first = seq.num_known  # the one pending token a sequence can have here
            if seq.num_pending and c.start <= first < c.start + c.length and seq.id in rows:
                dst.append(offset + first - c.start)
                src.append(rows[seq.id])
            offset += c.length
        return Feed(dst, src, self.tokens) if dst else None


def to_device(values: list[int], device, dtype=torch.long) -> torch.Tensor:
    """A host list as a tensor on `device` without waiting for the GPU's queue (a
    blocking host-to-device copy would wait for the step in flight)."""
    t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return t
    # From pinned memory the copy is queued behind the GPU's work; from pageable memory
    # the driver may wait for the stream first.
    return t.pin_memory().to(device, non_blocking=True)
