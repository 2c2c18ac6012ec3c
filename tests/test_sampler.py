"""The device sampler (dwc/runtime/sampler.py, docs/RUNTIME.md "Sampling"): every row of
a step drawn at once from its own temperature / top-k / top-p distribution, seeded rows
from their own generators whatever batch they share. (CPU here; the same tensor ops run
on the GPU, where tests/test_async_scheduling.py checks overlap on and off agree.)"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from dwc.runtime.sampler import distribution, filter_logits, filter_rows, sample_tensor
from dwc.runtime.sequence import SamplingParams, Sequence
from tests.test_speculative import CHI2_999, chi_square

VOCAB = 6
PARAMS = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.6, top_k=3),
          SamplingParams(temperature=1.3, top_p=0.8), SamplingParams(temperature=0.9,
                                                                       top_k=4, top_p=0.7)]


def rows(n_each: int):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(len(PARAMS), VOCAB, generator=g) * 1.5
    seqs = [Sequence([1], p) for p in PARAMS for _ in range(n_each)]
    return logits, logits.repeat_interleave(n_each, 0), seqs


def test_each_row_follows_its_own_distribution():
    """20,000 draws per parameter set in one batch: each set's counts pass a chi-square
    test against sampler.distribution (what speculative decoding's rule uses), and fail
    it against the unfiltered softmax where filtering changes the distribution."""
    n = 20000
    base, logits, seqs = rows(n)
    torch.manual_seed(0)
    tokens = sample_tensor(logits, seqs).view(len(PARAMS), n)
    for i, params in enumerate(PARAMS):
        want = distribution(base[i], params).double()
        counts = Counter(tokens[i].tolist())
        support = {x: float(want[x]) for x in range(VOCAB) if want[x] > 0}
        assert set(counts) <= set(support), (i, counts)  # filtered tokens never drawn
        assert chi_square(counts, support, n) < CHI2_999[5], (i, counts)
        if params.top_k or params.top_p < 1:
            plain = torch.softmax(base[i] / params.temperature, -1)
            expected = {x: float(plain[x]) for x in range(VOCAB)}
            assert chi_square(counts, expected, n) > 3 * CHI2_999[5]


@pytest.mark.parametrize("ties", [False, True])
def test_batched_filtering_is_filter_logits_row_by_row(ties):
    """Also with many ties (a top-p boundary inside a tie is cut by index, both ways)."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(64, 50, generator=g)
    logits[::7, :10] = 1.0  # ties at the k-th value are kept, as filter_logits keeps them
    if ties:
        logits = torch.randint(0, 4, (64, 50), generator=g).float()
    ks = [0, 1, 5, 10, 49, 50, 60, 3] * 8
    ps = [1.0, 0.5, 0.9, 0.99, 0.1, 1.0, 0.3, 0.75] * 8
    batched = filter_rows(logits, torch.tensor(ks), torch.tensor(ps))
    for i in range(64):
        one = filter_logits(logits[i], ks[i], ps[i])
        assert torch.equal(torch.isfinite(batched[i]), torch.isfinite(one)), i
        assert torch.equal(batched[i][torch.isfinite(one)], one[torch.isfinite(one)]), i


def test_greedy_rows_take_the_argmax_beside_sampled_ones():
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(3))
    seqs = [Sequence([1], SamplingParams(temperature=0.0 if i % 2 else 5.0)) for i in range(5)]
    for _ in range(20):
        tokens = sample_tensor(logits, seqs)
        assert tokens[1::2].tolist() == logits[1::2].argmax(-1).tolist()


@pytest.mark.parametrize("others", [0, 3, 17])
def test_a_seeded_row_does_not_depend_on_its_batch(others):
    """The same seed draws the same tokens alone or beside other (seeded or not) rows,
    in any row of the batch; another seed draws others."""
    logits = torch.zeros(1, 1000)  # uniform: any change of stream shows

    def draws(seed, n_others, at):
        seq = Sequence([1], SamplingParams(temperature=1.0, seed=seed))
        out = []
        for _ in range(8):
            batch = [Sequence([1], SamplingParams(temperature=1.0, seed=100 + j if j % 2 else None))
                     for j in range(n_others)]
            batch.insert(at, seq)
            tokens = sample_tensor(logits.expand(len(batch), -1), batch)
            out.append(int(tokens[at]))
        return out

    alone = draws(7, 0, 0)
    assert draws(7, others, others // 2) == alone
    assert draws(8, others, 0) != alone
