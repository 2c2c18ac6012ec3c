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


def test_tier_restores_exact_prefixes_and_leaks_nothing_under_random_load():
    """600 random requests over shared prefixes with aborts and preemption, a device
    cache too small to keep them and a host pool too small to keep them all: restored
    blocks hold their prefix's content, every device block comes back, the pool evicts."""
    rng = random.Random(1)
    num_blocks, page = 20, 4
    cache = torch.full((2, num_blocks * page, 1, 1), -1.0, dtype=torch.float64)
    blocks = BlockManager(num_blocks, page)
    blocks.tier = HostTier([cache], page, capacity_blocks=12)
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
    assert finished > 300 and stats.restored > 20 and stats.evicted > 0
    assert len(blocks.tier) <= 12 and stats.hit_tokens == stats.restored * page
    assert blocks.num_free == num_blocks and all(b.ref_count == 0 for b in blocks.blocks)


def test_pool_is_lru_and_a_touched_key_survives():
    cache = torch.arange(2 * 8 * 2, dtype=torch.float32).view(2, 8, 1, 2)
    tier = HostTier([cache], 2, capacity_blocks=2)
    tier.save(0, ("a",), 10)
    tier.save(1, ("b",), 11)
    assert tier.touch(("a",))          # a is now the most recent
    tier.save(2, ("c",), 12)           # evicts b, the least recently used
    assert tier.touch(("a",)) and tier.touch(("c",)) and not tier.touch(("b",))
    out = torch.zeros_like(cache)
    tier.caches = [out]
    assert tier.restore(("a",), 3) == 10 and tier.restore(("b",), 3) is None
    assert torch.equal(out[:, 6:8], cache[:, 0:2])  # block 0's K and V, now in block 3
    assert tier.stats.saved == 3 and tier.stats.evicted == 1 and tier.stats.restored == 1


def test_tier_settings_are_refused_with_the_reason():
    class Runner:
        cache = [torch.zeros(2, 64, 2, 8)]

    with pytest.raises(BadInput, match="tensor_parallel 2"):
        make_tier(1.0, [Runner()], 16, 2)
    with pytest.raises(BadInput, match="less than one block"):
        make_tier(1e-9, [Runner()], 16, 1)


def test_outputs_are_identical_with_the_tier_on_and_off(bundle):
    """Four long contexts, two turns each, through a device cache that holds about one:
    with the tier the second turns' prefixes come back from host memory, and every
    greedy output equals the one without the tier."""
    contexts = [f"# Notes on module {name}: how its helpers are used and tested.\n" * 4
                for name in ("os", "sys", "json", "re")]
    params = SamplingParams(max_tokens=8, ignore_eos=True)

    def run(host_gib: float):
        eng = Engine.from_bundle(bundle, EngineConfig(device="cpu", block_size=8, num_blocks=40,
                                                      kv_host_gib=host_gib))
        outs = [eng.generate([c + "import x\n"], params)[0].output_ids for c in contexts]
        outs += [eng.generate([c + "import y\n"], params)[0].output_ids for c in contexts]
        return outs, eng.blocks

    off, blocks_off = run(0.0)
    on, blocks_on = run(0.01)
    assert on == off
    assert blocks_off.tier is None and blocks_on.tier.stats.restored > 0
    assert blocks_on.hits > blocks_off.hits
