"""The host-memory tier under the prefix cache: what it copies, what it evicts, and that
outputs do not change with it (runtime/host_tier.py, docs/RUNTIME.md)."""

from __future__ import annotations

import random

import pytest
import torch

from dwc.errors import BadInput
from dwc.runtime.block_manager import BlockManager
from dwc.runtime.config import EngineConfig
from dwc.runtime.engine import Engine
from dwc.runtime.host_tier import HostTier, make_tier
from dwc.runtime.scheduler import Scheduler
from dwc.runtime.sequence import SamplingParams, Sequence


def _stamp(tokens) -> float:
    """What the fake model writes at a position: a function of every token up to it."""
    return float(hash(tuple(tokens)) % (1 << 20))


def _step(sched, blocks, cache, chunks, rng) -> int:
    """The fake model: write each computed position's stamp, append random tokens,
    seal; returns how many sequences finished."""
    blocks.tier.flush()  # as the engine does before launching
    finished = 0
    for c in chunks:
        seq = c.seq
        tokens = seq.tokens
        for p in range(c.start, c.end):
            cache[:, blocks.slot(seq, p)] = _stamp(tokens[:p + 1])
        new = 1 if c.logits else 0
        seq.output_ids.extend(rng.randrange(30) for _ in range(new))
        seq.num_computed = seq.num_tokens - 1 if new else c.end
        blocks.seal_full_blocks(seq)
        if len(seq.output_ids) >= seq.params.max_tokens:
            sched.finish(seq, "length")
            finished += 1
    return finished


def _check_cache(sched, blocks, cache) -> None:
    """Every position a running sequence counts as computed holds its own stamp: a block
    from the prefix cache or the host tier holds exactly that prefix's K/V."""
    for seq in sched.running:
        tokens = seq.tokens
        for p in range(seq.num_computed):
            assert float(cache[0, blocks.slot(seq, p)]) == _stamp(tokens[:p + 1]), (seq, p)


@pytest.mark.parametrize("capacity,batch_rows,device", [
    (12, None, "cpu"), (3, 2, "cpu"),
    pytest.param(12, 2, "cuda", marks=pytest.mark.gpu),
    pytest.param(3, 2, "cuda", marks=pytest.mark.gpu)])
def test_tier_restores_exact_prefixes_and_leaks_nothing_under_random_load(capacity, batch_rows,
                                                                          device):
    """600 random requests over shared prefixes with aborts and preemption, a device
    cache too small to keep them and a host pool too small to keep them all: restored
    blocks hold their prefix's content, every device block comes back, the pool evicts.
    The tiny pool with two-block batches reuses slots inside one step's queue (the
    flushes `save` makes before a copy out that must follow a queued copy in). On the
    GPU: the side stream's copies out, the ring of buffers, the waits for slots."""
    rng = random.Random(1)
    num_blocks, page = 20, 4
    cache = torch.full((2, num_blocks * page, 1, 1), -1.0, dtype=torch.float64, device=device)
    blocks = BlockManager(num_blocks, page)
    blocks.tier = HostTier([cache], page, capacity_blocks=capacity)
    blocks.tier.batch_rows = batch_rows or blocks.tier.batch_rows
    sched = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=32, num_speculative=0)
    prefixes = [[rng.randrange(30) for _ in range(16)] for _ in range(8)]
    live, finished = [], 0
    for _ in range(600):
        prompt = rng.choice(prefixes)[:rng.randrange(4, 17)] + \
            [rng.randrange(30) for _ in range(rng.randrange(0, 6))]
        seq = Sequence(prompt, SamplingParams(max_tokens=rng.randrange(1, 6)))
        sched.add(seq)
        live.append(seq)
        for _ in range(rng.randrange(0, 3)):
            finished += _step(sched, blocks, cache, sched.schedule(), rng)
            _check_cache(sched, blocks, cache)
        if rng.random() < 0.1:
            victim = live.pop(rng.randrange(len(live)))
            if victim.finish_reason is None:
                sched.finish(victim, "abort")
    while sched.has_work():
        finished += _step(sched, blocks, cache, sched.schedule(), rng)
        _check_cache(sched, blocks, cache)
    stats = blocks.tier.stats
    assert finished > 300 and stats.restored > 10 and stats.evicted > 0
    assert len(blocks.tier) <= capacity and stats.hit_tokens == stats.restored * page
    assert blocks.num_free == num_blocks and all(b.ref_count == 0 for b in blocks.blocks)


def test_pool_is_lru_and_a_touched_key_survives():
    cache = torch.arange(2 * 8 * 2, dtype=torch.float32).view(2, 8, 1, 2)
    tier = HostTier([cache], 2, capacity_blocks=2)
    tier.save(0, ("a",), 10)
    tier.save(1, ("b",), 11)
    assert tier.touch(("a",))          # a is now the most recent
    tier.save(2, ("c",), 12)           # evicts b, the least recently used
    assert tier.touch(("a",)) and tier.touch(("c",)) and not tier.touch(("b",))
    tier.flush()                       # the copies out, queued until now
    out = torch.zeros_like(cache)
    tier.caches = [out]
    assert tier.restore(("a",), 3) == 10 and tier.restore(("b",), 3) is None
    tier.flush()
    assert torch.equal(out[:, 6:8], cache[:, 0:2])  # block 0's K and V, now in block 3
    assert tier.stats.saved == 3 and tier.stats.evicted == 1 and tier.stats.restored == 1


def test_batched_copies_move_every_cache_exactly():
    """Caches of different dtypes (FP8 included) and shapes share a pool row; blocks
    saved in batches smaller than the queue, in scattered slots, come back bit-exact
    into other device blocks, and blocks not involved are left alone."""
    torch.manual_seed(0)
    page = 4
    caches = [torch.randn(2, 10 * page, 2, 8).to(torch.float8_e4m3fn),
              torch.randn(2, 10 * page, 1, 4, dtype=torch.bfloat16),
              torch.randn(2, 10 * page, 3, 2, dtype=torch.float32)]
    original = [c.clone() for c in caches]
    tier = HostTier(caches, page, capacity_blocks=6)
    tier.batch_rows = 2
    for block in (7, 2, 5, 0):
        tier.save(block, ("k", block), block)
    tier.free_slots.reverse()   # the next saves take slots out of order
    tier.save(9, ("k", 9), 9)
    tier.flush()
    for c in caches:
        c.view(torch.uint8).fill_(0)
    targets = {7: 1, 2: 3, 5: 4, 9: 8, 0: 6}
    for block, into in targets.items():
        assert tier.restore(("k", block), into) == block
    tier.flush()
    for c, o in zip(caches, original):
        c8, o8 = c.view(torch.uint8), o.view(torch.uint8)
        for block, into in targets.items():
            assert torch.equal(c8[:, into * page:(into + 1) * page],
                               o8[:, block * page:(block + 1) * page])
        assert not c8[:, 2 * page:3 * page].any()  # block 2 was not a target


def test_runs_group_adjacent_slots_in_order():
    from dwc.runtime.host_tier import _runs

    assert list(_runs([3, 4, 5, 9, 1, 2, 2])) == [(0, 3, 3), (3, 9, 1), (4, 1, 2), (6, 2, 1)]
    assert list(_runs([])) == []


def test_tier_settings_are_refused_with_the_reason():
    class Runner:
        cache = [torch.zeros(2, 64, 2, 8)]

    with pytest.raises(BadInput, match="tensor_parallel 2"):
        make_tier(1.0, [Runner()], 16, 2)
    with pytest.raises(ValueError, match="at least two blocks"):
        HostTier([torch.zeros(2, 64, 2, 8)], 16, capacity_blocks=1)  # a hit would evict itself
    with pytest.raises(BadInput, match="less than two blocks"):
        make_tier(1e-9, [Runner()], 16, 1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_outputs_are_identical_with_the_tier_on_and_off(bundle, device):
    """Four long contexts, two turns each, through a device cache that holds about one:
    with the tier the second turns' prefixes come back from host memory, and every
    greedy output equals the one without the tier. On the GPU: pinned pool, copies on
    the stream, CUDA graphs and overlapped steps."""
    contexts = [f"# Notes on module {name}: how its helpers are used and tested.\n" * 4
                for name in ("os", "sys", "json", "re")]
    params = SamplingParams(max_tokens=8, ignore_eos=True)

    def run(host_gib: float):
        eng = Engine.from_bundle(bundle, EngineConfig(device=device, dtype="float32",
                                                      block_size=8, num_blocks=40,
                                                      kv_host_gib=host_gib))
        if host_gib:
            eng.prefill_clock.min_tokens = 8  # the example's prompts are short
        outs = [eng.generate([c + "import x\n"], params)[0].output_ids for c in contexts]
        outs += [eng.generate([c + "import y\n"], params)[0].output_ids for c in contexts]
        return outs, eng.blocks, getattr(eng, "prefill_clock", None)

    off, blocks_off, _ = run(0.0)
    on, blocks_on, clock = run(0.01)
    assert on == off
    assert blocks_off.tier is None and blocks_on.tier.stats.restored > 0
    assert blocks_on.hits > blocks_off.hits
    # every token served from host memory is priced at the measured prefill rate
    assert clock.seconds_per_token > 0 and clock.priced_tokens == blocks_on.tier.stats.hit_tokens
    assert clock.saved_seconds == pytest.approx(clock.priced_tokens * clock.seconds_per_token,
                                                rel=0.8)


def test_prefill_clock_times_prompt_steps_and_prices_hits():
    from types import SimpleNamespace as NS

    from dwc.runtime.prefill_clock import PrefillClock

    clock = PrefillClock(gpu=False)
    clock.min_tokens = 10
    seq = NS(prompt_ids=list(range(40)))
    decode = NS(seq=NS(prompt_ids=[1, 2]), start=5, length=1)
    assert clock.start([NS(seq=seq, start=36, length=4), decode]) is None  # 4 prompt tokens
    clock.stop(None, hit_tokens=16)
    assert clock.saved_seconds == 0 and clock.priced_tokens == 0  # no rate yet: not priced
    timing = clock.start([NS(seq=seq, start=0, length=31), decode])
    assert timing[1] == 32  # the step's time is shared by all its tokens
    clock.stop((timing[0] - 0.032, 32), hit_tokens=16)  # 1 ms a token, at least
    assert clock.seconds_per_token >= 1e-3 and clock.priced_tokens == 16
    assert clock.saved_seconds == pytest.approx(16 * clock.seconds_per_token)
