"""Piecewise CUDA graphs: steps that carry prompt tokens, captured between attention calls.

A step with prompt tokens has shapes no single graph fits (how many prompts, how long,
from which position), so it used to run eagerly: about 950 kernel launches for the 8B
shape, 30-55 ms of host time against 16 ms of GPU work (a 512-token prompt beside 255
decoding sequences, profiled on the H200). Everything except the attention core is
row-independent, though, and depends only on the step's token count. So the decoder is
cut at its attention calls into pieces (Decoder.head, between, tail), each piece is
captured once per token-count size, and a step replays them with the attention core run
eagerly in between on the real rows (docs/RUNTIME.md, "Piecewise CUDA graphs").

Buffers: the input ids, positions and cache slots, the rotated queries each piece leaves
and the attention output the next piece reads are static tensors sized for the largest
size and shared by all sizes. Everything else a piece makes lives in one graph memory
pool: a piece's residual output is read by the next piece only, and the pieces replay in
the order they were captured, so later pieces may reuse the memory of earlier ones. The
pool holds about one step's activations of the largest size (counted in the KV plan).

Padding rows (a step of n tokens replays the next size up) have id 0 at position 0 and
write their K/V to the scratch block's first slot; no attention reads them and no real
row depends on them.
"""

from __future__ import annotations

import torch

from dwc.runtime.model import Batch, Decoder


class PiecewiseGraphs:
    def __init__(self, decoder: Decoder, cache: list[torch.Tensor], scratch_slot: int,
                 sizes: list[int]):
        self.decoder = decoder
        self.cache = cache
        self.scratch = scratch_slot
        self.sizes = sorted(sizes)
        n, dev = self.sizes[-1], cache[0].device
        shape = (n, decoder.num_heads, decoder.head_dim)
        self.ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slots = torch.full((n,), scratch_slot, dtype=torch.long, device=dev)
        self.q = torch.zeros(shape, dtype=decoder.dtype, device=dev)
        self.attn = torch.zeros(shape, dtype=decoder.dtype, device=dev)
        # An EAGLE head's tapped layers (Decoder.taps), copied out by the pieces that make
        # them: the pool's memory of one piece is reused by later ones.
        taps = len(decoder.taps) * decoder.embed.weight.shape[-1] if decoder.taps else 0
        self.tapped = torch.zeros(n, taps, dtype=decoder.dtype, device=dev) if taps else None
        self.pieces: dict[int, list] = {}   # size -> one callable per piece (a replay)
        self.hidden: dict[int, torch.Tensor] = {}  # size -> the last piece's output
        self._kept: dict[int, tuple] = {}   # size -> rotary tables every piece reads
        self._state: tuple = ()             # uncaptured pieces: what the next one takes

    def fits(self, tokens: int) -> bool:
        return tokens <= self.sizes[-1]

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first (its pool blocks serve the smaller ones),
        after one uncaptured run of the same pieces (Triton compiles, cuBLAS plans,
        cached scales made outside the graphs)."""
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for size in reversed(self.sizes):
                self._warm_up(size)
                stream.synchronize()
                self._capture_size(size, pool)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()

    def _capture_size(self, size: int, pool) -> None:
        graphs, state = [], (None, None, None)
        for k in range(len(self.decoder.layers) + 1):
            graph = torch.cuda.CUDAGraph()
            # capture_begin/end, not torch.cuda.graph(): that collects garbage and empties
            # the allocator's cache before each capture, seconds over hundreds of pieces.
            graph.capture_begin(pool=pool)
            state = self._piece(k, size, *state)
            graph.capture_end()
            graphs.append(graph.replay)
        self.pieces[size] = graphs
        self.hidden[size] = state[0]
        self._kept[size] = state[1:]

    def _warm_up(self, size: int) -> None:
        state = (None, None, None)
        for k in range(len(self.decoder.layers) + 1):
            state = self._piece(k, size, *state)

    def uncaptured(self) -> None:
        """Run the pieces without graphs, through the same buffers and padding (a CPU
        or a test: what capture() replaces with replays)."""
        for size in self.sizes:
            self.pieces[size] = [lambda k=k, n=size: self._run_uncaptured(k, n)
                                 for k in range(len(self.decoder.layers) + 1)]

    def _run_uncaptured(self, k: int, size: int) -> None:
        self._state = self._piece(k, size, *(self._state if k else (None, None, None)))
        self.hidden[size] = self._state[0]

    def _piece(self, k: int, n: int, residual, cos, sin) -> tuple:
        """Piece k at n rows: (residual, cos, sin) for the next piece; the last piece's
        first element is the hidden states before the final norm."""
        d = self.decoder
        if k == 0:
            _, residual, cos, sin = d.head(self.ids[:n], self.positions[:n], self.slots[:n],
                                           self.cache, self.q[:n])
        elif k < len(d.layers):
            _, residual = d.between(k, self.attn[:n], residual, cos, sin, self.slots[:n],
                                    self.cache, self.q[:n])
        else:
            residual = d.tail(self.attn[:n], residual)
        if k and k - 1 in d.taps:  # piece k leaves layer k - 1's output (Decoder.forward)
            h = residual.shape[-1]
            j = d.taps.index(k - 1)
            self.tapped[:n, j * h:(j + 1) * h].copy_(residual)
        return residual, cos, sin

    @torch.inference_mode()
    def run(self, batch: Batch) -> torch.Tensor:
        """Logits of the batch's sample rows: its inputs copied into the buffers (the
        rows past them made padding), the pieces replayed at the next size up, each
        layer's attention run eagerly on the real rows between them."""
        n = batch.input_ids.shape[0]
        size = next(s for s in self.sizes if s >= n)
        self.ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.slots[:n].copy_(batch.slots)
        if n < size:
            self.ids[n:size].zero_()
            self.positions[n:size].zero_()
            self.slots[n:size].fill_(self.scratch)
        q, attn, d = self.q[:size], self.attn[:size], self.decoder
        *pieces, last = self.pieces[size]
        for i, piece in enumerate(pieces):
            piece()
            d.attend(i, q, batch, self.cache[i], out=attn)
        last()
        if self.tapped is not None:
            d.tapped = self.tapped[:n]
        return d.logits(self.hidden[size], batch.sample_rows)
