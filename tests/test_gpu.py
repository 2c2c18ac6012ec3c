"""GPU kernels against PyTorch references (run on the lent device; skipped on CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from dwc.runtime.engine import Engine, EngineConfig
from dwc.runtime.sequence import SamplingParams
from tests.test_runtime import PROMPTS
from tests.test_speculative import weak_draft  # noqa: F401  (a fixture)

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads, kv_heads, d, page", [(32, 8, 128, 16), (4, 2, 64, 8), (8, 8, 64, 16),
                                                     (12, 4, 96, 16)])  # head_dim not a power of two
def test_paged_decode_kernel_matches_the_reference(dtype, heads, kv_heads, d, page):
    from dwc.runtime.layers.attention import paged_attention
    from dwc.runtime.kernels.paged_attention_triton import paged_decode

    gen = torch.Generator(device="cuda").manual_seed(0)
    num_blocks, lens = 64, [1, 7, 16, 33, 200]
    cache = torch.randn(2, num_blocks * page, kv_heads, d, device="cuda", dtype=dtype, generator=gen)
    perm = torch.randperm(num_blocks, device="cuda", generator=gen)
    tables, used = [], 0
    for n in lens:
        blocks = -(-n // page)
        tables.append(perm[used:used + blocks].tolist())
        used += blocks
    width = max(len(t) for t in tables)
    table_t = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32,
                           device="cuda")
    q = torch.randn(len(lens), heads, d, device="cuda", dtype=dtype, generator=gen)
    got = paged_decode(q, cache, table_t, torch.tensor(lens, dtype=torch.int32, device="cuda"),
                       page, d ** -0.5)
    for i, n in enumerate(lens):
        slots = torch.tensor([tables[i][p // page] * page + p % page for p in range(n)],
                             device="cuda")
        want = paged_attention(q[i:i + 1].double(), cache.double(), slots, n - 1, d ** -0.5)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        torch.testing.assert_close(got[i:i + 1].double(), want, atol=tol, rtol=tol)


def test_gpu_engine_is_token_identical_to_transformers_in_float32(bundle):
    from transformers import AutoModelForCausalLM

    eng = Engine.from_bundle(bundle, EngineConfig(device="cuda", dtype="float32", num_blocks=256))
    hf = AutoModelForCausalLM.from_pretrained(bundle / "model", dtype=torch.float32).cuda()
    for p in PROMPTS:
        ours = eng.generate([p], SamplingParams(max_tokens=40, ignore_eos=True))[0].output_ids
        ids = eng.tokenizer(p, return_tensors="pt", add_special_tokens=False).input_ids.cuda()
        ref = hf.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, ids.shape[1]:].tolist()
        assert ours == ref


@pytest.mark.parametrize("target", ["h100-fp8", "a100-int8-sq", "h100-int4-awq"])
def test_quantized_kernels_match_the_fake_quant_reference(build_for, target):
    """Each kernel-backed Linear against compressed-tensors' module on the same input,
    then the whole model's logits against transformers on the same bundle."""
    from transformers import AutoModelForCausalLM

    bundle = build_for(target)
    eng = Engine.from_bundle(bundle, EngineConfig(device="cuda", num_blocks=256))
    assert eng.runner.kernels == 28  # every quantized projection of the 4 layers
    d = eng.runner.decoder
    attn = d.layers[0].self_attn
    for rows in (37, 3):  # the W8A8 path and (FP8) the weight-only path for few tokens
        x = torch.randn(rows, attn.q_proj.in_features, device="cuda", dtype=torch.bfloat16)
        # The bundle's fusion plan stacked q/k/v; the reference may run offloaded on the CPU.
        want = torch.cat([m(x).float().to(x.device) for m in (attn.q_proj, attn.k_proj,
                                                                attn.v_proj)], dim=-1)
        torch.testing.assert_close(d.proj[0]["qkv"](x).float(), want,
                                   atol=0.05 * want.abs().max().item(), rtol=0.05)
    hf = AutoModelForCausalLM.from_pretrained(bundle / "model").cuda()
    seq = eng.add(PROMPTS[3], SamplingParams(max_tokens=1))
    eng.scheduler.schedule()
    from dwc.runtime.scheduler import Chunk

    logits = eng.runner.run([Chunk(seq, 0, len(seq.prompt_ids), logits=1)], eng.blocks)[0]
    with torch.no_grad():
        ref = hf(torch.tensor([seq.prompt_ids], device="cuda")).logits[0, -1].float()
    assert (logits - ref).abs().max() < 0.05 * ref.abs().max()
    assert logits.argmax() == ref.argmax()


def test_paged_decode_kernel_reads_an_fp8_cache_with_scales():
    from dwc.runtime.layers.attention import paged_attention, write_kv
    from dwc.runtime.kernels.paged_attention_triton import paged_decode

    gen = torch.Generator(device="cuda").manual_seed(1)
    heads, kv_heads, d, page, n = 32, 8, 128, 16, 77
    k = torch.randn(n, kv_heads, d, device="cuda", generator=gen) * 3
    v = torch.randn(n, kv_heads, d, device="cuda", generator=gen)
    scales = (float(k.abs().max()) / 448, float(v.abs().max()) / 448)
    cache = torch.zeros(2, 8 * page, kv_heads, d, device="cuda", dtype=torch.float8_e4m3fn)
    slots = torch.arange(n, device="cuda")
    write_kv(cache, slots, k, v, scales)
    q = torch.randn(1, heads, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    table = torch.arange(8, dtype=torch.int32, device="cuda")[None]
    got = paged_decode(q, cache, table, torch.tensor([n], dtype=torch.int32, device="cuda"),
                       page, d ** -0.5, scales)
    want = paged_attention(q.float(), cache, slots, n - 1, d ** -0.5, scales)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("fp8", [False, True])
def test_split_kv_decode_matches_the_unsplit_kernel_and_the_reference(fp8):
    """Few sequences at long contexts take the split-KV path (4 sequences x 8 KV heads:
    16 parts on a 132-SM GPU); contexts of one tile, of a few tiles (fewer parts than
    the split) and of thousands; every split against the float64 reference,
    repeated calls bit-identical (the counters come back to zero; a fixed order)."""
    from dwc.runtime.kernels.paged_attention_triton import _tiles, paged_decode, split_for
    from dwc.runtime.layers.attention import paged_attention

    gen = torch.Generator(device="cuda").manual_seed(3)
    heads, kv_heads, d, page, lens = 32, 8, 128, 16, [1, 300, 2049, 8191]
    dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    scales = (0.02, 0.01) if fp8 else (1.0, 1.0)
    cache, tables = _paged_cache(sum(-(-n // page) for n in lens), page, kv_heads, d,
                                 dtype, gen, lens)
    width = max(len(t) for t in tables)
    table_t = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32,
                           device="cuda")
    lens_t = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn(len(lens), heads, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    assert split_for(len(lens) * kv_heads, q.device) > 1
    tiles = _tiles(q.dtype, d, len(lens) * kv_heads, fp8)
    default = paged_decode(q, cache, table_t, lens_t, page, d ** -0.5, scales)
    for _ in range(3):
        assert torch.equal(paged_decode(q, cache, table_t, lens_t, page, d ** -0.5, scales),
                           default)
    for split in (1, 3, 32):
        got = paged_decode(q, cache, table_t, lens_t, page, d ** -0.5, scales,
                           config=(*tiles, split))
        for i, n in enumerate(lens):
            slots = torch.tensor([tables[i][p // page] * page + p % page for p in range(n)],
                                 device="cuda")
            ref_cache = cache if fp8 else cache.double()
            want = paged_attention(q[i:i + 1].double(), ref_cache, slots, n - 1, d ** -0.5,
                                   scales).double()
            torch.testing.assert_close(got[i:i + 1].double(), want, atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(default[i:i + 1].double(), want, atol=2e-2, rtol=2e-2)


def _paged_cache(num_blocks, page, kv_heads, d, dtype, gen, lens):
    """A random cache and shuffled block tables of sequences of `lens` tokens."""
    cache = torch.randn(2, num_blocks * page, kv_heads, d, device="cuda", generator=gen)
    cache = cache.to(dtype)
    perm = torch.randperm(num_blocks, device="cuda", generator=gen).tolist()
    tables, used = [], 0
    for n in lens:
        blocks = -(-n // page)
        tables.append(perm[used:used + blocks])
        used += blocks
    return cache, tables


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn])
@pytest.mark.parametrize("heads, kv_heads, d, page", [(32, 8, 128, 16), (4, 2, 64, 8), (8, 8, 64, 16),
                                                     (12, 4, 96, 16)])  # head_dim not a power of two
def test_paged_prefill_kernel_matches_the_reference(dtype, heads, kv_heads, d, page):
    """Chunks of every kind in one launch, at their rows of a step that also holds
    other rows: whole prompts, later pieces of a prompt (start > 0), lengths around the
    tile sizes; an FP8 cache with scales (bf16 queries)."""
    from dwc.runtime.layers.attention import paged_attention
    from dwc.runtime.kernels.paged_prefill_triton import paged_prefill
    from dwc.runtime.kernels.prefill_tiles import PrefillGroup, block_q_for, tile_table

    gen = torch.Generator(device="cuda").manual_seed(2)
    spans = [(0, 17), (0, 128), (40, 97), (130, 300), (0, 1), (256, 129)]  # (start, length)
    cache, tables = _paged_cache(256, page, kv_heads, d, dtype, gen, [s + n for s, n in spans])
    qdtype = torch.bfloat16 if dtype == torch.float8_e4m3fn else dtype
    scales = (0.7, 1.3) if dtype == torch.float8_e4m3fn else (1.0, 1.0)
    gap = 5  # rows the kernel must neither read nor write (decode rows of the step)
    chunks, row = [], gap
    for start, n in spans:
        chunks.append((row, n, start))
        row += n + gap
    q = torch.randn(row, heads, d, device="cuda", dtype=qdtype, generator=gen)
    out = torch.full_like(q, 7.0)
    block_q = block_q_for(qdtype, d, heads // kv_heads)
    width = max(len(t) for t in tables)
    group = PrefillGroup(
        torch.tensor(tile_table(chunks, block_q), dtype=torch.int32, device="cuda"),
        torch.tensor(chunks, dtype=torch.int32, device="cuda"),
        torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32,
                     device="cuda"), page, block_q)
    paged_prefill(q, cache, group, d ** -0.5, scales, out)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for (start, n), (r, _, _), table in zip(spans, chunks, tables):
        slots = torch.tensor([table[p // page] * page + p % page for p in range(start + n)],
                             device="cuda")
        want = paged_attention(q[r:r + n].double(), cache.double() if dtype != torch.float8_e4m3fn
                               else cache, slots, start, d ** -0.5, scales)
        torch.testing.assert_close(out[r:r + n].double(), want.double(), atol=tol, rtol=tol)
        assert (out[r - gap:r] == 7.0).all()


def test_paged_decode_kernel_reads_and_writes_given_rows():
    from dwc.runtime.kernels.paged_attention_triton import paged_decode

    gen = torch.Generator(device="cuda").manual_seed(3)
    lens = [5, 40, 100]
    cache, tables = _paged_cache(32, 16, 8, 128, torch.bfloat16, gen, lens)
    table_t = torch.tensor([t + [0] * (7 - len(t)) for t in tables], dtype=torch.int32,
                           device="cuda")
    lens_t = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn(9, 32, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    rows = torch.tensor([6, 0, 3], device="cuda")
    out = torch.full_like(q, 7.0)
    paged_decode(q, cache, table_t, lens_t, 16, 128 ** -0.5, out=out, rows=rows)
    want = paged_decode(q[rows], cache, table_t, lens_t, 16, 128 ** -0.5)
    torch.testing.assert_close(out[rows], want, atol=0, rtol=0)
    others = [r for r in range(9) if r not in (6, 0, 3)]
    assert (out[others] == 7.0).all()


def test_speculative_greedy_is_token_identical_on_the_gpu(bundle, weak_draft):
    """Verification chunks run in the paged decode kernel (one row per token): greedy
    output equal to plain decoding, float32, batch 1 and 12, weak and perfect drafts."""
    from tests.test_speculative import MORE_PROMPTS

    params = SamplingParams(max_tokens=33, ignore_eos=True)
    config = EngineConfig(device="cuda", dtype="float32", num_blocks=512)
    plain = Engine(bundle / "model", config).generate(MORE_PROMPTS, params)
    for draft in (weak_draft, bundle / "model"):
        spec = Engine(bundle / "model", config, draft_dir=draft, draft_k=4)
        assert [o.output_ids for o in spec.generate(MORE_PROMPTS, params)] == \
            [o.output_ids for o in plain]
        alone = spec.generate([MORE_PROMPTS[5]], params)[0]
        assert alone.output_ids == plain[5].output_ids
        assert spec.speculation()["steps"] > 0 and spec.blocks.num_free == 512


def test_cuda_graph_steps_match_eager_steps(bundle):
    """Decode steps replayed from CUDA graphs (padded to a captured size) give the same
    greedy tokens as eager steps in float32, at batch 1 and 12, and bf16 logits within
    rounding; padding rows leave every block free afterwards."""
    from tests.test_speculative import MORE_PROMPTS

    params = SamplingParams(max_tokens=30, ignore_eos=True)
    outs = {}
    for graphs in (False, True):
        eng = Engine(bundle / "model", EngineConfig(device="cuda", dtype="float32",
                                                    num_blocks=512, cuda_graphs=graphs))
        assert (eng.runner.graphs is not None) == graphs
        outs[graphs] = [o.output_ids for o in eng.generate(MORE_PROMPTS, params)]
        outs[graphs].append(eng.generate([MORE_PROMPTS[3]], params)[0].output_ids)
        assert eng.blocks.num_free == 512
    assert outs[True] == outs[False]
    from dwc.runtime.scheduler import Chunk

    logits = {}
    for graphs in (False, True):
        # Synchronous: the runner is driven by hand next, with the prefills' tokens on
        # the host (an overlapped step would leave them pending on the device).
        eng = Engine(bundle / "model", EngineConfig(device="cuda", num_blocks=64,
                                                    cuda_graphs=graphs, async_scheduling=False))
        seqs = [eng.add(p, SamplingParams(max_tokens=4)) for p in PROMPTS[:3]]
        eng.step()  # the prefills
        for s in seqs:
            eng.blocks.grow(s, s.num_tokens)
        chunks = [Chunk(s, s.num_computed, 1, logits=1) for s in seqs]
        logits[graphs] = eng.runner.run(chunks, eng.blocks)
    torch.testing.assert_close(logits[True], logits[False], atol=0.05, rtol=0.02)


def test_piecewise_graph_steps_match_eager_steps(bundle, build_for):
    """Steps with prompt tokens replayed piecewise (padded to a captured size, attention
    run eagerly between the pieces) give the eager path's greedy tokens in float32, with
    chunked prompts beside decoding rows, and leave every block free; on an FP8 bundle a
    mixed step's logits match the eager step's within bf16 rounding."""
    from tests.test_speculative import MORE_PROMPTS

    params = SamplingParams(max_tokens=30, ignore_eos=True)
    outs = {}
    for pieces in (False, True):
        eng = Engine(bundle / "model", EngineConfig(
            device="cuda", dtype="float32", num_blocks=512, max_num_batched_tokens=96,
            piecewise_graphs=pieces))
        assert (eng.runner.pieces is not None) == pieces
        outs[pieces] = [o.output_ids for o in eng.generate(MORE_PROMPTS + PROMPTS, params)]
        assert eng.blocks.num_free == 512
    assert outs[True] == outs[False]

    from dwc.runtime.scheduler import Chunk

    fp8 = build_for("h100-fp8")
    plan = json.loads((fp8 / "manifest.json").read_text())["kv_cache"]
    eng = Engine.from_bundle(fp8, EngineConfig.from_plan(
        plan, num_blocks=256, max_num_batched_tokens=256, async_scheduling=False))
    seqs = [eng.add(p, SamplingParams(max_tokens=4)) for p in PROMPTS[:3]]
    eng.step()  # the prefills: the three now decode beside a new prompt
    late = eng.add(PROMPTS[2] + MORE_PROMPTS[4], SamplingParams(max_tokens=4))  # > 16 tokens
    for s in seqs + [late]:
        eng.blocks.grow(s, s.num_tokens)
    chunks = [Chunk(s, s.num_computed, 1, logits=1) for s in seqs] + \
        [Chunk(late, 0, late.num_tokens, logits=1)]
    kind, lists = eng.runner.plan(chunks, eng.blocks)
    assert kind == "pieces"
    eager = eng.runner.execute(("eager", lists))
    torch.testing.assert_close(eng.runner.execute((kind, lists)), eager, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("residual", [False, True])
def test_fused_norm_and_silu_kernels_match_torch(residual):
    from dwc.runtime.kernels import fused_triton
    from dwc.runtime.layers import norm

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(37, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
    r = torch.randn(37, 4096, device="cuda", dtype=torch.bfloat16, generator=gen) if residual else None
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16, generator=gen)
    y, res = fused_triton.add_rms_norm(x, r, w, 1e-5)
    want_y, want_res = norm.add_rms_norm(x, r, w, 1e-5)
    torch.testing.assert_close(res, want_res, atol=0, rtol=0)  # the same rounded sum
    torch.testing.assert_close(y, want_y, atol=2e-2, rtol=1e-2)
    gu = torch.randn(37, 2 * 14336, device="cuda", dtype=torch.bfloat16, generator=gen)
    torch.testing.assert_close(fused_triton.silu_mul(gu), norm.silu_mul(gu), atol=2e-2, rtol=1e-2)


def test_fused_norm_and_silu_kernels_write_fp8_as_quantize_fp8_would():
    """With an output scale the kernels write FP8: the very bits of quantize_fp8 on their
    bf16 output (the unfused pair the FP8 GEMM path ran before)."""
    from dwc.runtime.kernels import fused_triton

    gen = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(300, 4096, device="cuda", dtype=torch.bfloat16, generator=gen) * 4
    r = torch.randn(300, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16, generator=gen) * 3
    scale = torch.tensor([[0.011]], device="cuda")
    y, res = fused_triton.add_rms_norm(x, r, w, 1e-5)
    y8, res8 = fused_triton.add_rms_norm(x, r, w, 1e-5, scale)
    assert y8.dtype == torch.float8_e4m3fn and torch.equal(res8, res)
    assert torch.equal(y8.view(torch.uint8), fused_triton.quantize_fp8(y, scale).view(torch.uint8))
    gu = torch.randn(300, 2 * 14336, device="cuda", dtype=torch.bfloat16, generator=gen) * 3
    s8 = fused_triton.silu_mul(gu, scale)
    want = fused_triton.quantize_fp8(fused_triton.silu_mul(gu), scale)
    assert s8.dtype == torch.float8_e4m3fn
    assert torch.equal(s8.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("target", ["h100-fp8", "a100-int8-sq", "h100-int4-awq"])
def test_fused_quantized_model_matches_unfused(build_for, target):
    """Stacked quantized GEMMs and the fused kernels against the unfused runtime: the
    logits of a decode step after each prompt agree within bf16 rounding (as quantization
    amplifies it)."""
    bundle = build_for(target)
    # Synchronous steps: the runner is driven by hand after the prefill's step.
    fused = Engine.from_bundle(bundle, EngineConfig(device="cuda", num_blocks=256,
                                                    async_scheduling=False))
    assert "qkv" in fused.runner.decoder.proj[0] and fused.runner.kernels == 28
    plain = Engine(bundle / "model", EngineConfig(device="cuda", num_blocks=256,
                                                  kv_dtype=fused.config.kv_dtype,
                                                  kv_scales=fused.config.kv_scales,
                                                  async_scheduling=False))
    # INT8 quantizes activations per token, so a last-bit difference in a norm output can
    # move a rounding step: greedy sequences may part after a while, logits stay close.
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    for prompt in PROMPTS:
        logits, first = [], None
        for eng in (fused, plain):
            seq = eng.add(prompt, params)
            eng.step()  # the prefill and its sampled token; both then decode the same one
            first = seq.output_ids[-1] if first is None else first
            seq.output_ids[-1] = first
            eng.blocks.grow(seq, seq.num_tokens)
            from dwc.runtime.scheduler import Chunk

            logits.append(eng.runner.run([Chunk(seq, seq.num_computed, 1, logits=1)], eng.blocks))
            eng.abort(seq)
        torch.testing.assert_close(logits[0], logits[1], atol=0.05 * logits[1].abs().max().item(),
                                   rtol=0.05)


@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("n, k", [(6144, 4096), (4096, 14336), (1000, 256), (28672, 4096)])
@pytest.mark.parametrize("fp8", [True, False])
def test_skinny_gemm_matches_the_reference(m, n, k, fp8):
    """Every split (n picks it: 1000 and 4096 rows split 4 or 2, 28672 split 2 or 1),
    masked tails (n = 1000, k = 256 < one slice of 128 x 4), repeated calls (the tile
    counters must come back to zero)."""
    from dwc.runtime.kernels.skinny_gemm_triton import skinny_linear

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    if fp8:
        w = (torch.randn(n, k, device="cuda", generator=gen) * 100).clamp(-448, 448) \
            .to(torch.float8_e4m3fn)
        s = torch.rand(n, device="cuda", generator=gen) / 100 + 1e-3
        want = x.double() @ (w.double() * s.double()[:, None]).t()
    else:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        s = None
        want = x.double() @ w.double().t()
    for _ in range(3):
        got = skinny_linear(x, w, s).double()
        torch.testing.assert_close(got, want, atol=2e-2 * want.abs().max().item(), rtol=2e-2)


def test_quantize_fp8_kernel_matches_the_torch_expression():
    from dwc.runtime.kernels.fused_triton import quantize_fp8

    gen = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(300, 4096, device="cuda", dtype=torch.bfloat16, generator=gen) * 40
    scale = torch.tensor([[0.07]], device="cuda")
    want = (x.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    got = quantize_fp8(x, scale)
    assert got.dtype == torch.float8_e4m3fn and got.shape == x.shape
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_skinny_gemm_is_deterministic():
    """The last program of a tile sums the K slices in a fixed order: same bits each run."""
    from dwc.runtime.kernels.skinny_gemm_triton import skinny_linear

    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(3, 14336, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = torch.randn(4096, 14336, device="cuda", dtype=torch.bfloat16, generator=gen)
    first = skinny_linear(x, w)
    for _ in range(20):
        assert torch.equal(skinny_linear(x, w), first)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("heads, kvh, d", [(32, 8, 128), (14, 2, 64)])
def test_fused_rope_kv_matches_rotary_and_cache_write(fp8, heads, kvh, d):
    """The fused kernel on views of a stacked QKV output, against apply_rotary +
    write_kv: q within bf16 rounding, the cache rows it writes likewise, others untouched
    (head counts that are not powers of two: Qwen2's 14 / 2)."""
    from dwc.runtime.kernels import fused_triton
    from dwc.runtime.layers.attention import write_kv
    from dwc.runtime.layers.rotary import apply_rotary

    gen = torch.Generator(device="cuda").manual_seed(0)
    t = 9
    qkv = torch.randn(t, (heads + 2 * kvh) * d, device="cuda", dtype=torch.bfloat16, generator=gen)
    q, k, v = qkv.split([heads * d, kvh * d, kvh * d], dim=-1)
    q, k, v = q.reshape(t, heads, d), k.reshape(t, kvh, d), v.reshape(t, kvh, d)
    angles = torch.rand(t, d // 2, device="cuda", generator=gen) * 6
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)
    slots = torch.randperm(64, device="cuda", generator=gen)[:t]
    dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    scales = (0.02, 0.03) if fp8 else (1.0, 1.0)
    cache = torch.zeros(2, 64, kvh, d, device="cuda", dtype=dtype)
    want_cache = cache.clone()
    got_q = fused_triton.rope_kv(q, k, v, cos, sin, slots, cache, scales)
    want_q = apply_rotary(q, cos, sin)
    write_kv(want_cache, slots, apply_rotary(k, cos, sin), v, scales)
    torch.testing.assert_close(got_q.float(), want_q.float(), atol=3e-2, rtol=2e-2)
    # Compared as the values the cache stands for (times the scales). The reference rounds
    # each rotary product to bf16 (up to ~0.02 off on unit-sized values, more where the two
    # terms cancel); the kernel rounds once. FP8 E4M3 keeps 3 mantissa bits, so a value at
    # a rounding boundary may also land one step (12.5%) away.
    scale = torch.tensor(scales, device="cuda").view(2, 1, 1, 1)
    torch.testing.assert_close(cache.float() * scale, want_cache.float() * scale,
                               atol=3e-2, rtol=0.13 if fp8 else 2e-2)
