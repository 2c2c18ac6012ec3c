"""The runtime on CPU: greedy output identical to transformers, batch independence,
prefix caching, preemption, sampling, and the block manager under random load."""

from __future__ import annotations

import random

import pytest
import torch

from dwc.runtime.block_manager import BlockManager
from dwc.runtime.engine import Engine, EngineConfig
from dwc.runtime.scheduler import Scheduler
from dwc.runtime.sequence import SamplingParams, Sequence

PROMPTS = ["import os\nimport sys\n\ndef main():\n",
           "class Foo(object):\n    def __init__(self",
           "# Copyright 2001 Python Software Foundation\n" * 3,
           "def _check(value):\n    if not isinstance(value, int):\n        raise"]


@pytest.fixture(scope="module")
def hf_reference(bundle):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(bundle / "model", dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(bundle / "model")


def hf_greedy(hf_reference, prompt: str, n: int) -> list[int]:
    model, tok = hf_reference
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=tok.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


def engine(bundle, **kw) -> Engine:
    """The CPU path, also on a GPU machine (GPU behaviour: tests/test_gpu.py)."""
    return Engine.from_bundle(bundle, EngineConfig(device="cpu", **kw))


@pytest.mark.parametrize("budget", [64, 2048])
def test_greedy_is_token_identical_to_transformers(bundle, hf_reference, budget):
    """64: chunked prefill (later chunks attend per sequence); 2048: every prompt whole in
    the first step, attended together right-padded (prompts of 11 to 39 tokens: two
    length groups)."""
    eng = engine(bundle, num_blocks=64, max_num_batched_tokens=budget)
    outs = eng.generate(PROMPTS, SamplingParams(max_tokens=40, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        assert out.output_ids == hf_greedy(hf_reference, prompt, 40), prompt
        assert out.finish_reason == "length"


def test_piecewise_path_is_token_identical(bundle, hf_reference):
    """The piecewise-graph path (its pieces run uncaptured here: the same static
    buffers, padding rows and scratch block the GPU's replays use) gives transformers'
    greedy tokens, with chunked prompts beside decoding rows and steps padded up."""
    from dwc.runtime.piecewise_graphs import PiecewiseGraphs

    eng = engine(bundle, num_blocks=64, max_num_batched_tokens=48)
    r = eng.runner
    page = r.block_size
    r.cache = [torch.cat([c, torch.zeros_like(c[:, :page])], dim=1) for c in r.cache]
    pieces = PiecewiseGraphs(r.decoder, r.cache, len(eng.blocks.blocks) * page, [8, 20, 48])
    pieces.uncaptured()
    r.pieces, sizes, run = pieces, [], pieces.run
    pieces.run = lambda batch: sizes.append(batch.input_ids.shape[0]) or run(batch)
    outs = eng.generate(PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        assert out.output_ids == hf_greedy(hf_reference, prompt, 24), prompt
    assert 48 in sizes and any(n not in (8, 20, 48) for n in sizes)  # chunks, and padding
    assert not r.cache[0][:, -page + 1:].any()  # padding wrote the scratch block's first slot only


def test_same_output_alone_and_in_a_busy_batch(bundle):
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    alone = engine(bundle).generate([PROMPTS[1]], params)[0].output_ids
    busy = engine(bundle, max_num_batched_tokens=48, num_blocks=40)
    others = [p + str(i) for i in range(12) for p in PROMPTS[:3]]
    outs = busy.generate(others[:6] + [PROMPTS[1]] + others[6:], params)
    assert outs[6].output_ids == alone


def test_prefix_cache_hits_and_unchanged_outputs(bundle):
    eng = engine(bundle, block_size=8)
    system = "# A long shared system prompt about the os module and its helpers.\n" * 4
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    first = eng.generate([system + "import os\n"], params)[0]
    hits_before = eng.blocks.hits
    second = eng.generate([system + "import os\n", system + "import sys\n"], params)
    assert eng.blocks.hits - hits_before >= 2 * 8 * (len(first.prompt_ids) // 8 - 1)
    assert second[0].output_ids == first.output_ids
    cold = engine(bundle, block_size=8).generate([system + "import sys\n"], params)[0]
    assert second[1].output_ids == cold.output_ids


def test_preemption_recomputes_to_the_same_tokens(bundle):
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    roomy = engine(bundle).generate(PROMPTS, params)
    tight = engine(bundle, num_blocks=9, block_size=8)  # not enough for all four at once
    outs = tight.generate(PROMPTS, params)
    assert tight.scheduler.preemptions > 0
    assert [o.output_ids for o in outs] == [o.output_ids for o in roomy]
    assert tight.blocks.num_free == 9


def test_sampling_seed_stop_and_limits(bundle):
    eng = engine(bundle)
    sampled = SamplingParams(max_tokens=20, temperature=0.9, top_k=50, top_p=0.9, seed=7,
                             ignore_eos=True)
    a = eng.generate([PROMPTS[0]], sampled)[0]
    b = eng.generate([PROMPTS[0]], sampled)[0]
    assert a.output_ids == b.output_ids  # the seed decides
    c = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=20, temperature=0.9, seed=8,
                                                  ignore_eos=True))[0]
    assert c.output_ids != a.output_ids
    greedy = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=30, ignore_eos=True))[0]
    stop = greedy.text[5:8]
    cut = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=30, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == greedy.text[:greedy.text.find(stop)]
    from dwc.errors import BadInput
    with pytest.raises(BadInput, match="exceeds the context limit of 1024"):
        eng.add("x " * 1000, SamplingParams(max_tokens=100))


def test_a_late_stop_string_ends_the_sequence_where_the_whole_text_would(bundle):
    """Stop strings are looked for in the newest tokens' text only: over a long output the
    sequence still ends at the first token whose text completes the stop string (what
    the whole text says), and each check decodes a bounded window, not the output."""
    from dwc.runtime.sequence import Sequence, finish_reason

    eng = engine(bundle)
    long = eng.generate([PROMPTS[1]], SamplingParams(max_tokens=160, ignore_eos=True))[0]
    ids, text = long.output_ids, long.text
    for stop in (text[120:124], text[140:141] + text[141:143]):
        first = text.find(stop)
        want = next(t for t in range(1, len(ids) + 1) if stop in eng.tokenizer.decode(ids[:t]))
        cut = eng.generate([PROMPTS[1]], SamplingParams(max_tokens=160, ignore_eos=True,
                                                        stop=[stop]))[0]
        assert cut.finish_reason == "stop" and len(cut.output_ids) == want
        assert cut.text == text[:first]
    lengths = []

    class Counting:
        def decode(self, ids):
            lengths.append(len(ids))
            return eng.tokenizer.decode(ids)

    seq = Sequence([1, 2], SamplingParams(max_tokens=2000, stop=["never", "x"]))
    seq.output_ids = ids * 6
    assert finish_reason(seq, ids[-1], set(), Counting(), 4096) is None
    assert lengths[0] == 4 * len("never") + 2 and max(lengths) <= lengths[0] + 3


def test_stop_strings_spelled_in_byte_tokens_are_found_on_time():
    """SentencePiece tokenizers with byte fallback (Llama-2, Mistral) spell unknown
    characters as <0xNN> tokens and decode a run of them that starts inside a character
    as U+FFFD throughout: the window moves back to the character's first byte, and the
    sequence stops at the token where the whole text first holds the stop string."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    from dwc.runtime.sequence import Sequence, finish_reason

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in ("\u2581", "\u2581a", "a", "\u2581hello", "."):
        vocab[piece] = len(vocab)
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    raw.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token="<unk>")

    def spelled(text):
        return [vocab[f"<0x{b:02X}>"] for b in text.encode()]

    cases = [([vocab["\u2581hello"]] + spelled("\u4e16\u754c\u4f60\u597d") + [vocab["\u2581a"]],
              "\u4f60\u597d"),
             (spelled("\U0001F600\U0001F603\U0001F604\U0001F601\U0001F606"), "\U0001F604")]
    for out, stop in cases:
        want = next(n for n in range(1, len(out) + 1) if stop in tok.decode(out[:n]))
        seq = Sequence([1], SamplingParams(max_tokens=100, stop=[stop]))
        for n, token in enumerate(out, 1):
            seq.output_ids.append(token)
            if finish_reason(seq, token, {2}, tok, 4096):
                break
        assert n == want, (stop, n, want)


def test_top_k_top_p_filtering():
    from dwc.runtime.sampler import filter_logits

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = torch.isfinite(filter_logits(logits, top_k=0, top_p=0.7))
    assert kept.tolist() == [True, True, False, False]
    kept = torch.isfinite(filter_logits(logits, top_k=3, top_p=1.0))
    assert kept.tolist() == [True, True, True, False]


def _run_scheduled(sched, blocks, chunks, rng) -> int:
    """What the engine does after running the model: append the chunk's new tokens (a
    verification chunk: a random number of accepted draft tokens plus one), roll back
    the rest, seal. Returns how many sequences finished."""
    finished = 0
    for c in chunks:
        seq = c.seq
        new = rng.randrange(1, c.lookahead + 2) if c.logits else 0
        seq.output_ids.extend(rng.randrange(50) for _ in range(new))
        seq.num_computed = seq.num_tokens - 1 if new else c.end
        if c.lookahead:
            blocks.trim(seq, seq.num_tokens)
        blocks.seal_full_blocks(seq)
        if len(seq.output_ids) >= seq.params.max_tokens:
            assert len(seq.output_ids) == seq.params.max_tokens  # lookahead never overshoots
            sched.finish(seq, "length")
            finished += 1
    return finished


@pytest.mark.parametrize("speculative, num_blocks", [(0, 48), (3, 24)])
def test_block_manager_and_scheduler_under_random_load(speculative, num_blocks):
    """1,000 random requests with aborts, preemption and (with a draft) verification
    steps whose rejected tokens are rolled back: every block comes back."""
    rng = random.Random(0)
    blocks = BlockManager(num_blocks=num_blocks, block_size=4)
    sched = Scheduler(blocks, max_num_seqs=16, max_num_batched_tokens=64,
                      num_speculative=speculative)
    live: list[Sequence] = []
    finished = 0
    prefixes = [[rng.randrange(50) for _ in range(12)] for _ in range(5)]
    for i in range(1000):
        prompt = rng.choice(prefixes)[:rng.randrange(1, 13)] + \
            [rng.randrange(50) for _ in range(rng.randrange(0, 20))]
        seq = Sequence(prompt, SamplingParams(max_tokens=rng.randrange(1, 12)))
        sched.add(seq)
        live.append(seq)
        for _ in range(rng.randrange(0, 3)):
            finished += _run_scheduled(sched, blocks, sched.schedule(), rng)
        if live and rng.random() < 0.1:
            victim = live.pop(rng.randrange(len(live)))
            if victim.finish_reason is None:
                sched.finish(victim, "abort")
        used = {b for s in sched.running for b in s.block_table}
        assert all(blocks.blocks[b].ref_count > 0 for b in used)
        assert len(used) + blocks.num_free == num_blocks or any(
            blocks.blocks[b].ref_count > 1 for b in used)
        for s in sched.running:  # after a step no sequence holds more than it needs
            assert len(s.block_table) <= -(-s.num_tokens // 4)
    while sched.has_work():
        finished += _run_scheduled(sched, blocks, sched.schedule(), rng)
    assert finished > 500 and sched.preemptions > 0 and blocks.hits > 0
    assert blocks.num_free == num_blocks
    assert all(b.ref_count == 0 for b in blocks.blocks)


@pytest.mark.parametrize("target", ["h100-fp8", "h100-int4-awq", "a100-int8-sq"])
def test_quantized_bundles_match_the_fake_quant_reference(build_for, target):
    """The CPU path runs compressed-tensors' own quantized Linears inside dwc's paged
    decoder: logits within bf16 tolerance of transformers on the same bundle, and the
    same greedy tokens."""
    from transformers import AutoModelForCausalLM

    from dwc.runtime.scheduler import Chunk

    bundle = build_for(target)
    eng = engine(bundle)
    hf = AutoModelForCausalLM.from_pretrained(bundle / "model")
    seq = eng.add(PROMPTS[3], SamplingParams(max_tokens=1))
    eng.scheduler.schedule()  # allocates the blocks
    logits = eng.runner.run([Chunk(seq, 0, len(seq.prompt_ids), logits=1)], eng.blocks)[0]
    with torch.no_grad():
        ref = hf(torch.tensor([seq.prompt_ids])).logits[0, -1].float()
    assert (logits - ref).abs().max() < 0.05 * ref.abs().max()
    assert logits.argmax() == ref.argmax()
    eng.abort(seq)
    out = eng.generate([PROMPTS[1]], SamplingParams(max_tokens=20, ignore_eos=True))[0]
    tok = eng.tokenizer
    ids = tok(PROMPTS[1], return_tensors="pt", add_special_tokens=False).input_ids
    want = hf.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None,
                       pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    assert out.output_ids == want


def test_requests_beyond_the_cache_are_refused_and_generate_is_all_or_nothing(bundle):
    from dwc.errors import BadInput

    eng = engine(bundle, num_blocks=4, block_size=16)  # 64 tokens of KV in all
    with pytest.raises(BadInput, match="context limit of 64 tokens"):
        eng.add([1] * 50, SamplingParams(max_tokens=20))
    with pytest.raises(BadInput):
        eng.generate([PROMPTS[0], [1] * 60], SamplingParams(max_tokens=10))
    assert not eng.has_work()  # the first prompt was not left queued


def test_prefix_keys_are_exact_not_hashed():
    """Python's hash(-1) == hash(-2): keys built from hashes could match the wrong
    prefix. Keys name the parent block exactly, so a different prefix never matches."""
    blocks = BlockManager(num_blocks=8, block_size=2)
    a = Sequence([-1, 5, 7, 7, 9], SamplingParams())
    blocks.grow(a, 5)
    a.num_computed = 5
    blocks.seal_full_blocks(a)
    b = Sequence([-2, 5, 7, 7, 9], SamplingParams())
    blocks.match_prefix(b)
    assert b.num_cached == 0 and b.block_table == []
    c = Sequence([-1, 5, 7, 7, 3], SamplingParams())
    blocks.match_prefix(c)
    assert c.num_cached == 4 and c.block_table == a.block_table[:2]


def test_prefill_tiles_cover_every_query_once_heaviest_first():
    """The paged prefill kernel's programs (kernels/prefill_tiles.py): each query row of
    each chunk in exactly one tile, tiles that see more keys launched first."""
    from dwc.runtime.kernels.prefill_tiles import block_q_for, tile_table

    chunks = [(0, 300, 0), (300, 17, 40), (317, 129, 256), (446, 128, 0)]
    block_q = block_q_for(torch.bfloat16, 128, 4)
    tiles = tile_table(chunks, block_q)
    covered = sorted((c, m + i) for c, m in tiles for i in range(block_q)
                     if m + i < chunks[c][1])
    assert covered == sorted((c, i) for c, (_, n, _) in enumerate(chunks) for i in range(n))
    last_key = [chunks[c][2] + m for c, m in tiles]
    assert last_key == sorted(last_key, reverse=True)
    assert block_q == 32 and block_q_for(torch.bfloat16, 128, 7) == 16
    assert block_q_for(torch.float32, 128, 1) == 32


def test_engine_limits_and_release(bundle):
    """The public knobs measurement code uses: batch limits, and giving memory back."""
    eng = Engine(bundle / "model", EngineConfig(num_blocks=64, max_num_seqs=8))
    tokens = eng.scheduler.max_num_batched_tokens
    assert eng.set_limits(max_num_seqs=2) == (8, tokens)
    outs = eng.generate(PROMPTS[:3], SamplingParams(max_tokens=3, ignore_eos=True))
    assert [len(o.output_ids) for o in outs] == [3, 3, 3]
    assert (eng.scheduler.max_num_seqs, eng.scheduler.max_num_batched_tokens) == (2, tokens)
    eng.release()
    assert eng.runner is None and eng.scheduler is None and eng.blocks is None
    eng.release()  # twice is harmless


def test_schedule_hooks_and_the_overlap_switch(bundle):
    """What measurement code watches and turns (dwc/perf/calibration.py): every step's
    scheduled chunks reach the hooks; the overlap switch returns the previous setting."""
    eng = Engine(bundle / "model", EngineConfig(num_blocks=64))
    seen = []
    eng.schedule_hooks.append(lambda chunks: seen.append(len(chunks)))
    assert eng.set_overlap(False) is True and eng.set_overlap(False) is False
    eng.generate(PROMPTS[:2], SamplingParams(max_tokens=4, ignore_eos=True))
    assert seen and seen[0] == 2 and len(seen) >= 4
