"""Tensor parallelism (dwc/runtime/parallel/): 2 gloo processes on CPU give one
process's greedy tokens; the cuts' shapes and sums; KV heads replicated when there are
fewer than ranks (simulated in threads); refusals; the two-GPU target and its KV plan."""

from __future__ import annotations

import dataclasses
import threading
from types import SimpleNamespace

import pytest
import torch

from dwc.model.checkpoint import model_info
from dwc.errors import BadInput, TargetError
from dwc.runtime.parallel import layout, shard, workers as tp_workers
from dwc.runtime.engine import Engine, EngineConfig
from dwc.runtime.model_runner import ModelRunner, load_hf_model
from dwc.runtime.sequence import SamplingParams
from tests.conftest import dwc
from tests.test_runtime import PROMPTS
from tests.test_speculative import weak_draft  # noqa: F401  (a fixture)

GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


def cpu_config(**kw) -> EngineConfig:
    # float32: the sums of the row-parallel partials differ from one GEMM's only in the
    # last bits, far below the gaps between the example model's top logits.
    return EngineConfig(device="cpu", dtype="float32", num_blocks=64, **kw)


@pytest.fixture(scope="module")
def one_process(bundle):
    return Engine.from_bundle(bundle, cpu_config(max_num_batched_tokens=48))


@pytest.fixture
def two_processes(bundle, weak_draft):
    """Rank 0 also speculates with a draft model (it runs there, unsplit). Closed after
    its test: one process holds one tensor-parallel group at a time."""
    eng = Engine(bundle / "model", cpu_config(max_num_batched_tokens=48, tensor_parallel=2),
                 draft_dir=weak_draft, draft_k=3)
    yield eng
    workers = eng.tp.workers
    eng.close()
    assert [w.exitcode for w in workers] == [0]  # stopped by rank 0's None step


def test_two_gloo_processes_are_token_identical_to_one(one_process, two_processes):
    """Four prompts of 11 to 39 tokens at once (a 48-token step budget: chunked prefill,
    whole prompts padded together, decodes and verification steps beside prefills), then
    one alone; against one process without speculation."""
    d = two_processes.runner.decoder
    assert (d.num_heads, d.num_kv_heads) == (2, 1)             # 4 query / 2 KV heads, split
    assert two_processes.runner.cache[0].shape[2] == 1         # rank 0 caches its KV head
    together = [c.output_ids for c in two_processes.generate(PROMPTS, GREEDY)]
    assert together == [c.output_ids for c in one_process.generate(PROMPTS, GREEDY)]
    alone = two_processes.generate([PROMPTS[2]], SamplingParams(max_tokens=40, ignore_eos=True))
    ref = one_process.generate([PROMPTS[2]], SamplingParams(max_tokens=40, ignore_eos=True))
    assert alone[0].output_ids == ref[0].output_ids
    spec = two_processes.speculation()
    assert spec["steps"] > 0 and 0 < spec["accepted"] < spec["drafted"]


@dataclasses.dataclass
class ThreadGroup:
    """N ranks as threads of this process, with the collectives of tensor_parallel.Group
    (sums in rank order, so every rank gets the same bits)."""

    rank: int
    size: int
    shared: SimpleNamespace

    def _exchange(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.shared.slots[self.rank] = x.clone()
        self.shared.barrier.wait()
        parts = list(self.shared.slots)
        self.shared.barrier.wait()          # nobody overwrites a slot another still reads
        return parts

    def all_reduce(self, x):
        parts = self._exchange(x)
        total = parts[0]
        for p in parts[1:]:
            total = total + p
        return x.copy_(total)

    def gather_last_dim(self, local):
        parts = self._exchange(local)
        return torch.cat(parts, dim=-1) if self.rank == 0 else local

    def send_step(self, step):
        for q in self.shared.steps[1:]:
            q.put(step)

    def receive_step(self):
        return self.shared.steps[self.rank].get()


def threaded_runners(model_dir, size: int, num_blocks: int, block_size: int):
    import queue

    shared = SimpleNamespace(barrier=threading.Barrier(size), slots=[None] * size,
                             steps=[queue.Queue() for _ in range(size)])
    return [ModelRunner(load_hf_model(model_dir, "cpu", torch.float32), num_blocks, block_size,
                        "cpu", tp=ThreadGroup(r, size, shared)) for r in range(size)]


def test_replicated_kv_heads_give_the_same_tokens(bundle, one_process):
    """4 ranks over 2 KV heads: each rank keeps the one KV head its query head reads
    (ranks 0-1 head 0, ranks 2-3 head 1); greedy output is one process's."""
    runners = threaded_runners(bundle / "model", 4, 64, 16)
    kept = [(r.decoder.num_heads, r.decoder.num_kv_heads, r.cache[0].shape[2]) for r in runners]
    assert kept == [(1, 1, 1)] * 4
    full_k = load_hf_model(bundle / "model", "cpu", torch.float32).model.layers[0].self_attn.k_proj
    for rank, r in enumerate(runners):
        head = rank // 2
        assert torch.equal(r.decoder.proj[0]["k_proj"].weight,
                           full_k.weight[head * 64:(head + 1) * 64])
    workers = [threading.Thread(target=tp_workers.follow_steps, args=(r.tp, r), daemon=True)
               for r in runners[1:]]
    for w in workers:
        w.start()
    eng = Engine.from_bundle(bundle, cpu_config())
    eng.runner = runners[0]
    try:
        got = eng.generate(PROMPTS[:2], GREEDY)
    finally:
        runners[0].tp.send_step(None)
        for w in workers:
            w.join(timeout=30)
    want = one_process.generate(PROMPTS[:2], GREEDY)
    assert [c.output_ids for c in got] == [c.output_ids for c in want]


def test_layout_of_the_8b_shape_and_of_one_kv_head():
    dims = dict(num_heads=32, num_kv_heads=8, head_dim=128, intermediate=14336, vocab=128256)
    r1 = layout.Layout(1, 2, **dims)
    assert (r1.heads, r1.kv_heads) == (range(16, 32), range(4, 8))
    assert len(r1.rows("qkv")) == (16 + 2 * 4) * 128 and r1.rows("qkv")[0] == 16 * 128
    assert r1.rows("gate_up").tolist()[:1] + r1.rows("gate_up").tolist()[-1:] == \
        [7168, 2 * 14336 - 1]
    assert r1.cols("down_proj")[0] == 7168 and len(r1.cols("o_proj")) == 16 * 128
    assert r1.vocab_rows == range(64128, 128256)
    # 16 ranks over 8 KV heads: rank r's 2 query heads read KV head r // 2.
    assert [layout.Layout(r, 16, **dims).kv_heads for r in range(16)] == \
        [range(r // 2, r // 2 + 1) for r in range(16)]
    # Multi-query (one KV head): every rank keeps it; an uneven vocabulary pads the last.
    mqa = [layout.Layout(r, 4, num_heads=8, num_kv_heads=1, head_dim=16, intermediate=64,
                     vocab=10) for r in range(4)]
    assert [m.kv_heads for m in mqa] == [range(0, 1)] * 4
    assert [m.vocab_rows for m in mqa] == [range(0, 3), range(3, 6), range(6, 9), range(9, 10)]
    assert layout.kv_heads_per_rank(1, 4) == 1 and layout.kv_heads_per_rank(8, 2) == 4


def test_cut_projections_sum_to_the_whole(bundle):
    """Per layer: column cuts are the whole output's rows; row cuts sum to the whole; the
    vocabulary cuts of the embedding sum and of the lm_head line up."""
    model = load_hf_model(bundle / "model", "cpu", torch.float64)
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    x = torch.randn(5, 256, dtype=torch.float64)
    layouts = [layout.Layout(r, 2, 4, 2, 64, 768, 4096) for r in range(2)]
    for name, m in (("q_proj", attn.q_proj), ("k_proj", attn.k_proj), ("up_proj", mlp.up_proj)):
        cut = torch.cat([shard.cut_linear(m, rows=lay.rows(name))(x) for lay in layouts], dim=-1)
        torch.testing.assert_close(cut, m(x), rtol=1e-12, atol=1e-12)  # float64: BLAS order
    h = torch.randn(5, 768, dtype=torch.float64)
    parts = [shard.cut_linear(mlp.down_proj, cols=lay.cols("down_proj"))(h[:, lay.cols("down_proj")])
             for lay in layouts]
    torch.testing.assert_close(parts[0] + parts[1], mlp.down_proj(h), rtol=1e-12, atol=1e-12)
    local = SimpleNamespace(all_reduce=lambda t: t, gather_last_dim=lambda t: t)
    ids = torch.tensor([0, 5, 2047, 2048, 4095])
    emb = [shard.VocabParallelEmbedding(model.model.embed_tokens, lay, local)(ids) for lay in layouts]
    assert torch.equal(emb[0] + emb[1], model.model.embed_tokens(ids))
    heads = [shard.VocabParallelHead(model.lm_head, lay, local)(x) for lay in layouts]
    torch.testing.assert_close(torch.cat(heads, dim=-1), model.lm_head(x), rtol=1e-12, atol=1e-12)


def test_fp8_and_int8_kernel_cuts_keep_their_scales():
    """The GPU's kernel modules, cut on the CPU (as tensor-parallel runners do before
    moving the shards): a column cut keeps its rows' weights and per-channel scales, a
    row cut its columns and every scale; the per-tensor input scale stays; the bias is
    cut with the rows, and kept by rank 0 only in a row cut."""
    from dwc.runtime.layers.linear import Fp8Linear, Int8Linear

    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 32, generator=g)
    scale, bias, x_scale = torch.rand(48, generator=g) + 0.1, torch.randn(48, generator=g), \
        torch.tensor(0.02)
    rows, cols = torch.tensor([4, 5, 6, 40, 41]), torch.arange(16, 32)
    for kernel in (Fp8Linear(w.to(torch.float8_e4m3fn), scale, x_scale, bias),
                   Int8Linear(w.round().clamp(-128, 127).to(torch.int8), scale, x_scale, bias)):
        weight = kernel.weight_t.t()                                     # [out, in]
        scales = (kernel.scale_b if type(kernel) is Fp8Linear else kernel.scale_w).view(-1)
        col = shard.cut_linear(kernel, rows=rows)
        assert type(col) is type(kernel) and col.weight_t.t().is_contiguous()
        assert torch.equal(col.weight_t.t().float(), weight[rows].float())
        assert torch.equal((col.scale_b if type(col) is Fp8Linear else col.scale_w).view(-1),
                           scales[rows])
        assert torch.equal(col.bias, bias[rows]) and torch.equal(col.input_scale, kernel.input_scale)
        row = shard.cut_linear(kernel, cols=cols, keep_bias=False)
        assert torch.equal(row.weight_t.t().float(), weight[:, cols].float())
        assert torch.equal((row.scale_b if type(row) is Fp8Linear else row.scale_w).view(-1),
                           scales)
        assert row.bias is None and torch.equal(row.input_scale, kernel.input_scale)


def test_indivisible_heads_are_refused_in_one_line(bundle):
    with pytest.raises(BadInput, match="num_attention_heads 4 is not divisible by 3"):
        layout.check_layout(4, 2, 768, 3)
    with pytest.raises(BadInput, match="num_key_value_heads 3 neither divides by 2"):
        layout.check_layout(6, 3, 768, 2)
    with pytest.raises(BadInput, match="intermediate_size 769"):
        layout.check_layout(4, 2, 769, 2)
    int4 = {"quantization_config": {"config_groups": {"g": {"weights": {"num_bits": 4}}}}}
    with pytest.raises(BadInput, match="INT4 \\(W4A16\\) weights are not split yet"):
        layout.check_weights(int4, 2)
    layout.check_weights(int4, 1)
    with pytest.raises(BadInput, match="on the CPU only unquantized models are split"):
        layout.check_weights({"quantization_config": {"quant_method": "compressed-tensors"}}, 2,
                         "cpu")
    layout.check_weights({"quantization_config": {"config_groups": {"g": {"weights": {
        "num_bits": 8}}}}}, 2)
    with pytest.raises(BadInput, match="tensor_parallel 0: must be at least 1"):
        Engine.from_bundle(bundle, cpu_config(tensor_parallel=0))
    result = dwc("serve", bundle, "--tensor-parallel", "3")  # refused before any process starts
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: tensor_parallel 3: num_attention_heads 4 is not divisible by 3"]


def test_more_ranks_than_gpus_are_refused():
    n = torch.cuda.device_count() + 1
    with pytest.raises(BadInput, match=f"tensor_parallel {n} needs {n} GPUs; {n - 1} visible"):
        tp_workers.launch("unused", torch.bfloat16, {"device": "cuda"}, n)


def test_two_gpu_target_loads_and_plans_one_ranks_cache(example):
    from dwc.compiler.artifacts import Artifacts
    from dwc.passes.kv_layout import KvLayoutOptions, plan_kv
    from dwc.compiler.target import load_target

    two, one = load_target("h200x2-fp8"), load_target("h200-fp8")
    assert two.tensor_parallel == 2 and one.tensor_parallel == 1
    assert "tune" not in two.passes and two.summary()["tensor_parallel"] == 2
    info = model_info(example / "checkpoint")
    two.check_model(info)
    with pytest.raises(TargetError, match="h200x2-fp8: tensor_parallel 2: num_key_value_heads 3"):
        two.check_model(dataclasses.replace(info, num_heads=6, num_kv_heads=3))
    model = load_hf_model(example / "checkpoint", "cpu", torch.float32)
    plans = [plan_kv(SimpleNamespace(target=t, info=info, build=SimpleNamespace(slo=None),
                                     artifacts=Artifacts(model=model)), KvLayoutOptions())
             for t in (one, two)]
    assert plans[1]["tensor_parallel"] == 2 and plans[0]["tensor_parallel"] == 1
    assert plans[1]["bytes_per_token"] * 2 == plans[0]["bytes_per_token"]  # 1 of 2 KV heads
    assert abs(plans[1]["arithmetic"]["weight_bytes"] * 2 -
               plans[0]["arithmetic"]["weight_bytes"]) <= 1
    assert EngineConfig.from_plan(plans[1]).tensor_parallel == 2  # `dwc serve` follows it
    with pytest.raises(TargetError, match="tensor_parallel: must be at least 1"):
        dataclasses.replace(two, tensor_parallel=0).validate("")


# -- on the GPU (the lent device): two ranks share one GPU over gloo ---------------------

@pytest.mark.gpu
def test_fp8_kernel_cuts_match_the_whole_projection(build_for):
    """Column cuts of the stacked FP8 q/k/v and gate/up kernels give the whole output's
    columns (per-channel weight scales follow the rows); row cuts of down_proj sum to
    the whole (scales and the static input scale kept): both kernel paths (<= 16 tokens
    weight-only Triton, more tokens `_scaled_mm`)."""
    from dwc.runtime.layers.linear import Fp8Linear

    eng = Engine.from_bundle(build_for("h100-fp8"), EngineConfig(device="cuda", num_blocks=64,
                                                                cuda_graphs=False))
    d = eng.runner.decoder
    proj = d.proj[1]
    layouts = [layout.Layout(r, 2, d.num_heads, d.num_kv_heads, d.head_dim, d.intermediate_size,
                         d.embed.weight.shape[0]) for r in range(2)]
    gen = torch.Generator(device="cuda").manual_seed(0)
    for tokens in (3, 37):
        x = torch.randn(tokens, 256, device="cuda", dtype=torch.bfloat16, generator=gen)
        for name in ("qkv", "gate_up"):
            assert type(proj[name]) is Fp8Linear
            parts = [shard.cut_linear(proj[name], rows=lay.rows(name)) for lay in layouts]
            assert all(type(p) is Fp8Linear for p in parts)
            got = torch.cat([p(x) for p in parts], dim=-1).float()
            order = torch.cat([lay.rows(name) for lay in layouts]).cuda()
            want = proj[name](x)[:, order].float()
            torch.testing.assert_close(got, want, atol=0.01 * want.abs().max().item(), rtol=0.01)
        h = torch.randn(tokens, d.intermediate_size, device="cuda", dtype=torch.bfloat16,
                        generator=gen)
        cols = [lay.cols("down_proj").cuda() for lay in layouts]
        got = sum(shard.cut_linear(proj["down_proj"], cols=c)(h[:, c]).float() for c in cols)
        want = proj["down_proj"](h).float()
        torch.testing.assert_close(got, want, atol=0.02 * want.abs().max().item(), rtol=0.02)


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["float32", "fp8"])
def test_two_ranks_sharing_one_gpu_match_one(bundle, build_for, which):
    """gloo, since NCCL refuses two ranks on one GPU (and no CUDA graphs: gloo's
    collectives cannot be captured). float32: greedy tokens identical; FP8 kernels in
    bf16: the prompt's logits agree within bf16 rounding and pick the same token."""
    from dwc.runtime.scheduler import Chunk

    fp8 = which == "fp8"
    b = build_for("h100-fp8") if fp8 else bundle
    kw = dict(device="cuda", num_blocks=256, cuda_graphs=False, dtype=None if fp8 else "float32")
    one = Engine.from_bundle(b, EngineConfig(**kw))
    two = Engine.from_bundle(b, EngineConfig(**kw, tensor_parallel=2,
                                             tensor_parallel_backend="gloo"))
    try:
        assert two.runner.kernels == (28 if fp8 else 0)
        if not fp8:
            got = [c.output_ids for c in two.generate(PROMPTS, GREEDY)]
            assert got == [c.output_ids for c in one.generate(PROMPTS, GREEDY)]
            return
        for prompt in PROMPTS:
            logits = []
            for eng in (one, two):
                seq = eng.add(prompt, SamplingParams(max_tokens=1))
                eng.scheduler.schedule()
                logits.append(eng.runner.run([Chunk(seq, 0, len(seq.prompt_ids), logits=1)],
                                             eng.blocks)[0])
                eng.abort(seq)
            torch.testing.assert_close(logits[1], logits[0],
                                       atol=0.05 * logits[0].abs().max().item(), rtol=0.05)
            assert logits[1].argmax() == logits[0].argmax()
    finally:
        two.close()
