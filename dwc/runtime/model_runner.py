"""Loads the bundle's model, owns the KV cache, turns scheduled chunks into one batch."""

from __future__ import annotations

from pathlib import Path

import torch

from dwc.constants import KERNEL_MAX_CHUNK, piecewise_sizes
from dwc.runtime.block_manager import BlockManager
from dwc.runtime.inflight import Feed, InFlight, to_device
from dwc.runtime.logprobs import prompt_rows
from dwc.runtime.kernels.prefill_tiles import PrefillGroup, block_q_for, tile_table
from dwc.runtime.model import Batch, DecodeGroup, Decoder, PromptGroup
from dwc.runtime.piecewise_graphs import PiecewiseGraphs
from dwc.runtime.scheduler import PENDING, Chunk


def load_hf_model(model_dir: Path, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    # A compressed-tensors model runs in the dtype it was saved in: transformers refuses to
    # cast a quantized model, and loading one straight into float32 keeps FP8 weights its
    # forward cannot multiply. Unquantized models take the runner's dtype.
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True,
                                                 trust_remote_code=False)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and quantizer.quantization_config.is_quantization_compressed:
        # transformers decompresses on the model's first forward() through a hook; the
        # runtime calls the layers itself, so it decompresses here, once.
        quantizer.compressor.decompress_model(model=model)
        # Decompressing dispatches the modules with offload hooks that run them on the
        # device they were loaded on (the CPU); drop the hooks so .to(device) moves them.
        from compressed_tensors.offload.dispatch import remove_dispatch

        remove_dispatch(model, onload_tensors=True)
    model = model.to(device) if quantizer is not None else model.to(device, dtype)
    model.eval()
    model.requires_grad_(False)
    return model


class ModelRunner:
    """`hf_model` is a loaded model (see load_hf_model); `weights_dir` holds its
    compressed-tensors files, from which the GPU kernels are built. With `kv_dtype`
    "fp8_e4m3", K and V are stored in FP8 E4M3 divided by the per-layer `kv_scales`
    ([(k_scale, v_scale)] per layer; 1.0 when not given)."""

    observers: tuple = ()  # called with each step's chunks after it ran

    def __init__(self, hf_model, num_blocks: int, block_size: int, device: str = "cpu",
                 weights_dir: Path | None = None, kv_dtype: str | None = None,
                 kv_scales: list | None = None, graph_tokens: int = 0, fusion: dict | None = None,
                 tp=None, piecewise_tokens: int = 0, decoder_cls=Decoder,
                 taps: tuple[int, ...] = ()):
        """`graph_tokens` > 0 (GPU only): capture CUDA graphs for kernel-only steps of up
        to that many tokens (see cuda_graphs.py); `piecewise_tokens` > 0 (GPU, one
        process): capture the other steps of up to that many tokens piecewise
        (piecewise_graphs.py). `fusion`: a fusion plan (fusion.py). `decoder_cls`: an EAGLE
        head's own (eagle.py). `tp`: this process's tensor_parallel.Group; the runner
        keeps its rank's shard, and rank 0's `run` hands each step to the other ranks.
        `taps`: layers whose outputs every step keeps for an EAGLE head (eagle.py), set
        before the graphs are captured so that they keep them too."""
        self.device = device
        self.tp = tp
        self.hf_model = hf_model
        # Read once: a transformers config attribute costs microseconds, every step.
        self.max_context = int(hf_model.config.max_position_embeddings)
        self.decoder = d = decoder_cls(hf_model, device)
        d.taps = tuple(taps)
        # Tensor parallel: the kernels are built on the CPU; shard_decoder moves the shards.
        self.kernels = d.use_kernels(weights_dir, "cpu" if tp else device, fusion) \
            if device == "cuda" and weights_dir else 0
        if fusion:
            d.fuse(fusion)
        if tp is not None:
            from dwc.runtime.parallel.shard import shard_decoder

            shard_decoder(d, tp)
        if device == "cuda":
            d.use_skinny_gemm()
        fp8 = kv_dtype == "fp8_e4m3"
        cache_dtype = torch.float8_e4m3fn if fp8 else d.dtype
        graphs = device == "cuda" and graph_tokens > 0
        pieces = device == "cuda" and piecewise_tokens > 0 and tp is None
        scratch = graphs or pieces  # one block past the manager's: padding rows' K/V
        slots = (num_blocks + scratch) * block_size
        self.cache = [torch.zeros(2, slots, d.num_kv_heads, d.head_dim, dtype=cache_dtype,
                                  device=device) for _ in range(len(d.layers))]
        scales = kv_scales if fp8 and kv_scales else [(1.0, 1.0)] * len(d.layers)
        d.kv_scales = [tuple(float(x) for x in pair) for pair in scales]
        self.block_size = block_size
        self._capture(num_blocks, graph_tokens if graphs else 0,
                      piecewise_tokens if pieces else 0)

    def _capture(self, num_blocks: int, graph_tokens: int, piecewise_tokens: int) -> None:
        """The decode graphs and the piecewise graphs (none for 0 tokens)."""
        d, page = self.decoder, self.block_size
        self.graphs = None
        if graph_tokens:
            from dwc.runtime.cuda_graphs import DecodeGraphs

            width = -(-min(self.max_context, num_blocks * page) // page)
            self.graphs = DecodeGraphs(d, self.cache, page, width, num_blocks, graph_tokens)
            self.graphs.capture()
        self.pieces = None
        if piecewise_tokens:
            self.pieces = PiecewiseGraphs(d, self.cache, num_blocks * page,
                                          piecewise_sizes(piecewise_tokens))
            self.pieces.capture()


    def run(self, chunks: list[Chunk], blocks: BlockManager, flight: InFlight | None = None
            ) -> torch.Tensor:
        """Run one step; logits [sum of chunk.logits, vocab]: each chunk's last
        `chunk.logits` rows, in chunk order. `flight`: the step still in flight, whose
        sampled ids are this step's pending input tokens (asynchronous scheduling,
        inflight.py; one process only)."""
        g = self.graphs
        out = g.advance(chunks, flight) if g is not None and flight is not None and \
            self.tp is None else None
        if out is None:  # not the last decode step advanced on the device (cuda_graphs.py)
            feed = flight.feed(chunks) if flight is not None else None
            step = self.plan(chunks, blocks)
            if feed is None and PENDING in step[1][0]:  # its id would index the embedding
                raise RuntimeError("a pending token reached the model runner without its feed")
            if self.tp is not None:
                assert feed is None, "tensor-parallel ranks take their inputs from the host"
                self.tp.send_step(step)
            out = self.execute(step, feed)
            if g is not None and step[0] == "graph":
                g.remember(chunks)  # what the next step may advance from
            elif g is not None:
                g.last = None
        for observe in self.observers:  # an EAGLE head keeps the tapped layers (eagle.py)
            observe(chunks)
        return out

    def plan(self, chunks: list[Chunk], blocks: BlockManager) -> tuple[str, tuple]:
        """The step as plain lists: what `execute` needs, and what rank 0 of a
        tensor-parallel group sends the other ranks (which hold no scheduler)."""
        g, tokens = self.graphs, sum(c.length for c in chunks)
        if g is not None and all(c.length <= KERNEL_MAX_CHUNK for c in chunks) and \
                g.fits(tokens) and not prompt_rows(chunks):
            return "graph", self._kernel_rows(chunks, blocks)
        pieces = self.pieces is not None and self.pieces.fits(tokens)
        return "pieces" if pieces else "eager", self._batch_lists(chunks, blocks)

    def execute(self, step: tuple[str, tuple], feed: Feed | None = None) -> torch.Tensor:
        kind, lists = step
        if kind == "graph":
            return self.graphs.run(*lists, feed=feed)
        batch = self._batch(*lists)
        if feed is not None:
            feed.apply(batch.input_ids)
        if kind == "pieces":
            return self.pieces.run(batch)
        return self.decoder.forward(batch, self.cache)

    @staticmethod
    def _kernel_rows(chunks: list[Chunk], blocks: BlockManager):
        """A kernel-only step as lists, one row per token: ids, positions, slots, block
        tables, context lengths, and the rows whose logits are returned."""
        ids, positions, slots, tables, lens, rows = [], [], [], [], [], []
        page = blocks.block_size
        for c in chunks:  # per sequence: a hot loop at large batches (issue 18)
            if c.length == 1 and not c.draft:  # a decode row (the common case)
                seq, p = c.seq, c.start
                n_prompt = len(seq.prompt_ids)
                ids.append(PENDING if p >= n_prompt + len(seq.output_ids) else
                           seq.prompt_ids[p] if p < n_prompt else seq.output_ids[p - n_prompt])
                positions.append(p)
                table = seq.block_table
                slots.append(table[p // page] * page + p % page)
                tables.append(table)
                lens.append(p + 1)
                if c.logits:
                    rows.append(len(ids) - 1)
                continue
            positions.extend(range(c.start, c.start + c.length))
            ids.extend(c.token_ids())
            _kernel_chunk(c, blocks, slots, tables, lens)
            rows.extend(range(len(ids) - c.logits, len(ids)))
        return ids, positions, slots, tables, lens, rows

    def _batch_lists(self, chunks: list[Chunk], blocks: BlockManager) -> tuple:
        """Flatten the chunks. On the GPU, short chunks (decode and verification steps)
        go to the paged decode kernel as one group, one row per token, each row seeing
        the positions up to its own (that is the causal mask), and every longer chunk
        to the paged prefill kernel, all in one launch. On the CPU, whole prompts
        (chunks from position 0) are attended together, padded into batches of similar
        length; the other chunks (later pieces of a prompt) go one by one."""
        ids, positions, slots, parts, rows = [], [], [], [], []
        kernel_rows, tables, lens = [], [], []  # the kernel's token rows, their tables and lengths
        prompts = []  # CPU: (offset, length) of whole-prompt chunks
        prefill = []  # GPU: (offset, length, start, block table) of the longer chunks
        offset = 0
        gpu = self.device == "cuda"
        for c in chunks:
            ids.extend(c.token_ids())
            positions.extend(range(c.start, c.start + c.length))
            if gpu and c.length <= KERNEL_MAX_CHUNK:
                kernel_rows.extend(range(offset, offset + c.length))
                _kernel_chunk(c, blocks, slots, tables, lens)
            elif gpu:
                slots.extend(blocks.slot(c.seq, p) for p in range(c.start, c.start + c.length))
                prefill.append((offset, c.length, c.start, c.seq.block_table))
            elif c.start == 0:
                slots.extend(blocks.slot(c.seq, p) for p in range(c.length))
                prompts.append((offset, c.length))
            else:
                seq_slots = [blocks.slot(c.seq, p) for p in range(c.start + c.length)]
                slots.extend(seq_slots[c.start:])
                parts.append((offset, c.length, c.start, seq_slots))
            offset += c.length
            rows.extend(range(offset - c.logits, offset))
        rows.extend(prompt_rows(chunks))  # prompt logprobs: after every chunk's own rows
        return ids, positions, slots, parts, rows, kernel_rows, tables, lens, prompts, prefill

    def _batch(self, ids, positions, slots, parts, rows, kernel_rows, tables, lens,
               prompts, prefill) -> Batch:
        """The Batch of `_batch_lists`' lists, as tensors on this runner's device."""
        as_tensor = lambda x: to_device(x, self.device)  # noqa: E731
        return Batch(as_tensor(ids), as_tensor(positions), as_tensor(slots),
                     [(o, n, start, as_tensor(s)) for o, n, start, s in parts],
                     as_tensor(rows), self._decode_group(kernel_rows, tables, lens),
                     [self._prompt_group(g, slots) for g in _similar_lengths(prompts)],
                     self._prefill_group(prefill))

    def _prefill_group(self, prefill: list) -> PrefillGroup | None:
        if not prefill:
            return None
        d = self.decoder
        block_q = block_q_for(d.dtype, d.head_dim, d.num_heads // d.num_kv_heads)
        chunks = [(off, n, start) for off, n, start, _ in prefill]
        width = max(len(t) for *_, t in prefill)
        return PrefillGroup(
            tiles=to_device(tile_table(chunks, block_q), self.device, torch.int32),
            chunks=to_device(chunks, self.device, torch.int32),
            block_tables=to_device([t + [0] * (width - len(t)) for *_, t in prefill],
                                   self.device, torch.int32),
            page=self.block_size, block_q=block_q)

    def _prompt_group(self, group: list[tuple[int, int]], slots: list[int]) -> PromptGroup:
        """Right-pad whole-prompt chunks [(offset, length)] to the longest; padding
        repeats each chunk's first token row (and slot)."""
        width = max(length for _, length in group)
        gather = [[off + i if i < length else off for i in range(width)]
                  for off, length in group]
        rows = [off + i for off, length in group for i in range(length)]
        flat = [b * width + i for b, (_, length) in enumerate(group) for i in range(length)]
        dev = self.device
        return PromptGroup(to_device(gather, dev),
                           to_device([[slots[r] for r in g] for g in gather], dev),
                           to_device(flat, dev), to_device(rows, dev))

    def _decode_group(self, rows: list, tables: list, lens: list) -> DecodeGroup | None:
        if not rows:
            return None
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        return DecodeGroup(
            rows=to_device(rows, self.device),
            block_tables=to_device(padded, self.device, torch.int32),
            context_lens=to_device(lens, self.device, torch.int32),
            page=self.block_size)


def _similar_lengths(prompts: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Groups of (offset, length) whose lengths are within 2x of their group's longest,
    so padding at most doubles a group's attention work."""
    groups: list[list[tuple[int, int]]] = []
    for p in sorted(prompts, key=lambda p: -p[1]):
        if groups and 2 * p[1] >= groups[-1][0][1]:
            groups[-1].append(p)
        else:
            groups.append([p])
    return groups


def _kernel_chunk(c: Chunk, blocks: BlockManager, slots: list, tables: list, lens: list) -> None:
    """Append a chunk's decode-kernel rows: each token's cache slot, its sequence's block
    table, and the context it sees (every position up to its own)."""
    span = range(c.start, c.start + c.length)
    slots.extend(blocks.slot(c.seq, p) for p in span)
    tables.extend([c.seq.block_table] * c.length)
    lens.extend(p + 1 for p in span)
