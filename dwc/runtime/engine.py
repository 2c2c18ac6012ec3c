"""The engine: `step()` = schedule, run the model, sample, retire finished sequences.

    engine = Engine.from_bundle("bundles/demo")
    outputs = engine.generate(["def main():"], SamplingParams(max_tokens=32))
"""

from __future__ import annotations

from pathlib import Path

import torch

from dwc.errors import BadInput
from dwc.runtime import logprobs
from dwc.runtime.block_manager import BlockManager
from dwc.runtime.config import EngineConfig, from_bundle, runner_args, speculative_tokens
from dwc.runtime.inflight import InFlight
from dwc.runtime.memory import fit_blocks
from dwc.runtime.model_runner import ModelRunner, load_hf_model
from dwc.runtime.sampler import chunk_tokens, sample_tensor
from dwc.runtime.scheduler import Scheduler
from dwc.runtime.proposers import draft_taps, make_proposer
from dwc.runtime.host_tier import make_tier
from dwc.runtime.prefill_clock import PrefillClock
from dwc.runtime.sequence import Completion, SamplingParams, Sequence, Status, cut_at_stop, \
    eos_ids, finish_reason, raw_text


class Engine:
    def __init__(self, model_dir: Path, config: EngineConfig | None = None,
                 draft_dir: Path | None = None, draft_k: int = 0, fusion: dict | None = None):
        """`draft_dir`: a draft model (same tokenizer) for speculative decoding with
        `draft_k` drafted tokens per step (config.num_speculative_tokens overrides it).
        `fusion`: the bundle's fusion plan (dwc.runtime.fusion), applied to both models."""
        from transformers import AutoTokenizer

        self.config = c = config or EngineConfig()
        if c.tensor_parallel < 1:
            raise BadInput(f"tensor_parallel {c.tensor_parallel}: must be at least 1")
        device = c.device or ("cuda" if torch.cuda.is_available() else "cpu")
        # The CPU path computes in float32: CPU bf16 matmuls are slower, not faster, and
        # float32 keeps greedy decoding identical to the reference.
        dtype = getattr(torch, c.dtype or ("bfloat16" if device == "cuda" else "float32"))
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        ngram = c.speculative and c.speculative_method == "ngram"  # no draft model then
        k = speculative_tokens(c, draft_dir, draft_k, ngram)
        draft_dir = draft_dir if k and not ngram else None
        num_blocks = fit_blocks(model_dir, draft_dir, c, device, dtype, k)
        graph, args = runner_args(c, model_dir, num_blocks, k, device, fusion)
        args["taps"] = draft_taps(draft_dir)  # an EAGLE head's: kept by the graphs too
        self.tp = None  # rank 0 of a tensor-parallel group (parallel/workers.py)
        if c.tensor_parallel > 1:
            from dwc.runtime.parallel import workers

            self.tp = workers.launch(model_dir, dtype, args, c.tensor_parallel,
                                     c.tensor_parallel_backend)
        try:
            # Tensor parallel: loaded on the CPU and cut there (shard_decoder moves each
            # rank's share), so no GPU holds the whole model.
            model = load_hf_model(model_dir, "cpu" if self.tp else device, dtype)
            self.runner = ModelRunner(model, tp=self.tp, **args)
            if self.tp:
                self.tp.wait_ready()
        except BaseException:
            self.close(force=True)
            raise
        self.drafter = make_proposer(k, ngram, draft_dir, self.runner, num_blocks,
                                     c.block_size, device, dtype, graph, fusion)
        self.blocks = BlockManager(num_blocks, c.block_size)
        if c.kv_host_gib > 0:
            runners = [self.runner] + ([self.drafter.runner] if draft_dir else [])
            self.blocks.tier = make_tier(c.kv_host_gib, runners, c.block_size, c.tensor_parallel)
            self.prefill_clock = PrefillClock(torch.device(device).type == "cuda")
        self.scheduler = Scheduler(self.blocks, c.max_num_seqs, c.max_num_batched_tokens, k,
                                   self.drafter)
        self.eos_ids = eos_ids(self.runner.hf_model, self.tokenizer)
        self.inflight: InFlight | None = None  # the launched step not yet collected
        self.schedule_hooks: list = []  # each is called with every step's scheduled chunks

    def close(self, force: bool = False) -> None:
        """Stop the tensor-parallel workers (if any) and leave their group."""
        if self.tp:
            self.tp.close(force)
            self.tp = None

    def release(self) -> None:
        """Give the model, the KV cache and the graphs' memory back (the engine cannot
        step afterwards): for a caller that measured with it and needs the GPU next."""
        import gc

        self.close()
        self.runner = self.blocks = self.scheduler = self.drafter = self.inflight = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def set_limits(self, max_num_seqs: int | None = None,
                   max_num_batched_tokens: int | None = None) -> tuple[int, int]:
        """Change the scheduler's batch limits (None keeps one); returns the previous
        (max_num_seqs, max_num_batched_tokens)."""
        sched = self.scheduler
        old = sched.max_num_seqs, sched.max_num_batched_tokens
        sched.max_num_seqs = max_num_seqs or old[0]
        sched.max_num_batched_tokens = max_num_batched_tokens or old[1]
        return old

    def set_overlap(self, enabled: bool) -> bool:
        """Turn asynchronous scheduling on or off (inflight.py); returns the previous
        setting. Timing one step at a time needs it off."""
        old, self.config.async_scheduling = self.config.async_scheduling, enabled
        return old

    @classmethod
    def from_bundle(cls, bundle: Path, config: EngineConfig | None = None,
                    speculative: bool = True, tensor_parallel: int | None = None,
                    ngram: bool = False, kv_host_gib: float | None = None) -> "Engine":
        """Refuses a bundle whose files do not match its manifest. Sizes itself from the
        bundle's KV plan unless `config` says otherwise. Speculates with the bundle's draft
        (when it has one) unless `speculative` or config.speculative is False, or with
        n-gram lookup (`ngram`, ngram.py). Splits the model over `tensor_parallel`
        processes (None: the plan's, else config's); `kv_host_gib`: the host tier's size
        (host_tier.py; None: the plan's, else config's)."""
        return cls(*from_bundle(bundle, config, speculative, tensor_parallel, ngram, kv_host_gib))

    # -- requests ---------------------------------------------------------------------

    def add(self, prompt: str | list[int], params: SamplingParams | None = None) -> Sequence:
        params = params or SamplingParams()
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] \
            if isinstance(prompt, str) else list(prompt)
        self.check(ids, params)
        seq = Sequence(ids, params)
        self.scheduler.add(seq)
        return seq

    def check(self, ids: list[int], params: SamplingParams) -> None:
        """Refuse a request that cannot run, naming the limit."""
        if not ids:
            raise BadInput("empty prompt")
        limit = min(self.runner.max_context, len(self.blocks.blocks) * self.blocks.block_size)
        if len(ids) + params.max_tokens > limit:
            raise BadInput(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) "
                           f"exceeds the context limit of {limit} tokens")

    def abort(self, seq: Sequence) -> None:
        if seq.status is not Status.FINISHED:
            self.scheduler.finish(seq, "abort")

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self.inflight is not None

    # -- the loop -----------------------------------------------------------------------

    def step(self) -> list[Sequence]:
        """Schedule, (draft,) run, sample or verify; returns the sequences that finished.

        Asynchronously (inflight.py) when its tokens can be picked on the device (no
        draft, logprobs or tensor parallelism): the step is launched, then the
        previous one collected, so the host's work overlaps the GPU's. Otherwise the
        previous step is collected first and this one runs synchronously."""
        chunks = self.scheduler.schedule()
        tier = self.blocks.tier
        if tier is None:
            return self._run(chunks)
        tier.flush()  # the host tier's copies, before any kernel reads them
        timing = self.prefill_clock.start(chunks)
        finished = self._run(chunks)
        self.prefill_clock.stop(timing, tier.stats.hit_tokens)
        return finished

    def _run(self, chunks) -> list[Sequence]:
        for hook in self.schedule_hooks:  # measurement code watching the steps
            hook(chunks)
        if chunks and not self._overlappable(chunks):
            finished = self._collect()
            live = [c for c in chunks if c.seq.status is Status.RUNNING]
            return finished + self._step_sync(live)
        launched = self._launch(chunks) if chunks else None
        finished = self._collect()
        self.inflight = launched
        return finished

    def _overlappable(self, chunks) -> bool:
        """Overlap needs every token picked on the device (sampler.sample_tensor): no
        draft, tensor parallelism, or logprobs (recorded on the host from the logits)."""
        return (self.config.async_scheduling and self.drafter is None
                and self.runner.tp is None  # the runner's own group: a test may swap it in
                and (self.scheduler.num_logprobs == 0  # no need to look at each chunk
                     or not logprobs.wanted(chunks)))

    def _launch(self, chunks) -> InFlight:
        """Run a step without waiting for it: its tokens are picked on the device
        (argmax, or sampler.sample_tensor's draws) and start their way to the host; the
        chunks' K/V count as computed."""
        logits = self.runner.run(chunks, self.blocks, self.inflight)
        sampled, page, seal = [], self.blocks.block_size, self.blocks.seal_full_blocks
        for c in chunks:  # per sequence: a hot loop at large batches (issue 18)
            seq, end = c.seq, c.start + c.length - c.lookahead  # c.end, inlined
            seq.num_computed = end
            if end // page > seq.num_sealed:  # a block may have filled (else a no-op)
                seal(seq, min(end, seq.num_known))
            if c.logits:
                seq.num_pending += 1
                sampled.append(seq)
        tokens = sample_tensor(logits, sampled) if self.scheduler.num_sampled else \
            logits.argmax(-1)
        return InFlight.start(tokens, sampled)

    def _collect(self) -> list[Sequence]:
        """Wait for the step in flight (if any) and append its tokens; returns the
        sequences they finished. A sequence finished meanwhile drops its token."""
        flight, self.inflight = self.inflight, None
        if flight is None:
            return []
        finished, page, seal = [], self.blocks.block_size, self.blocks.seal_full_blocks
        eos, tokenizer, context = self.eos_ids, self.tokenizer, self.runner.max_context
        for seq, token in zip(flight.seqs, flight.wait()):
            status = seq.status
            if status is Status.FINISHED:
                continue
            seq.num_pending -= 1
            out = seq.output_ids
            out.append(token)
            if status is Status.RUNNING and seq.num_computed // page > seq.num_sealed:
                seal(seq, min(seq.num_computed, seq.num_known))
            p = seq.params
            # finish_reason's cheap conditions first: most tokens end nothing.
            if token in eos or p.stop or len(out) >= p.max_tokens or \
                    len(seq.prompt_ids) + len(out) >= context:
                reason = finish_reason(seq, token, eos, tokenizer, context)
                if reason:
                    self.scheduler.finish(seq, reason)
                    finished.append(seq)
        return finished

    def _step_sync(self, chunks) -> list[Sequence]:
        if not chunks:
            return []
        if self.drafter:
            self.drafter.propose(chunks, self.blocks)
        logits = self.runner.run(chunks, self.blocks)
        new_tokens = chunk_tokens(chunks, logits, self.drafter)
        if logprobs.wanted(chunks):  # before _advance: it reads the tokens' positions
            logprobs.record(chunks, logits, new_tokens)
        return [c.seq for c, tokens in zip(chunks, new_tokens) if self._advance(c, tokens)]

    def _advance(self, c, tokens: list[int]) -> bool:
        """Append a chunk's new tokens (up to a finishing one), roll back what the cache
        holds past them, seal full blocks; True when the sequence finished."""
        seq, reason = c.seq, None
        for token in tokens:
            seq.output_ids.append(token)
            reason = self._finish_reason(seq, token)
            if reason:
                break
        # The cache now holds every token but the newest one (its K/V come next step).
        # After a verification step that drops the rejected draft tokens' entries.
        seq.num_computed = seq.num_tokens - 1 if tokens else c.end
        if c.lookahead:
            self.blocks.trim(seq, seq.num_tokens)
        computed = seq.num_computed
        if self.drafter and self.drafter.has_cache:
            seq.draft_computed = min(seq.draft_computed, computed)
            computed = seq.draft_computed  # a block is shared only when both caches hold it
        self.blocks.seal_full_blocks(seq, computed)
        if reason:
            self.scheduler.finish(seq, reason)
        return reason is not None

    def speculation(self) -> dict | None:
        """Speculative decoding so far: steps, drafted, accepted, acceptance rate, mean
        tokens per verification step (None without a draft)."""
        d = self.drafter
        return dict(d.stats.as_dict(), k=d.k, method=d.method) if d else None

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        return finish_reason(seq, token, self.eos_ids, self.tokenizer, self.runner.max_context)

    def text(self, seq: Sequence) -> str:
        """The generated text, cut before the first stop string, without the EOS token."""
        return cut_at_stop(raw_text(self.tokenizer, seq, self.eos_ids), seq.params.stop)

    def generate(self, prompts: list, params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[Completion]:
        """Run prompts to completion, all batched together; results in prompt order."""
        params = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        seqs = []
        try:
            for p, sp in zip(prompts, params):
                seqs.append(self.add(p, sp))
        except BadInput:
            for seq in seqs:  # all or nothing: none of this call's requests stay queued
                self.abort(seq)
            raise
        while self.has_work():
            self.step()
        return [Completion(s.prompt_ids, s.output_ids, self.text(s), s.finish_reason) for s in seqs]

