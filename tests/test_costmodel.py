"""The cost model's arithmetic against hand-computed figures, the tuning decision, and the
exit-4 path when the SLO cannot be met."""

from __future__ import annotations

import json
import math

import pytest

from dwc.perf.costmodel import (Calibration, Machine, ModelFigures, interpolate, max_rps,
                           poisson_quantile, predict, prefill_seconds, replicas, step_seconds,
                           usd_per_million_tokens)
from tests.conftest import assert_clean_error, dwc, write_buildfile

M = Machine(bandwidth=1e12, peak_flops=1e15, usd_per_hour=3.0, eta_bw=0.5, eta_f=0.5,
            s0=1e-3, s1=1e-5)
F = ModelFigures(weight_bytes=1e9, params=5e8, kv_bytes_per_token=1e5)


def test_step_and_prefill_by_hand():
    # bytes 1e9 + 4 * 1000 * 1e5 = 1.4e9 at 0.5e12 B/s = 2.8 ms (FLOPs: 4e9 / 0.5e15 = 8 us)
    assert step_seconds(M, F, 4, 1000) == pytest.approx(1e-3 + 4e-5 + 2.8e-3)
    # KV-bound: 1000 sequences of 1000 tokens: bytes 1e9 + 1e11 at 0.5e12 B/s = 0.202 s
    assert step_seconds(M, F, 1000, 1000) == pytest.approx(1e-3 + 1e-2 + 0.202)
    # compute-bound: 4000 tokens, no context: 4e12 FLOPs / 0.5e15 = 8 ms > 2 ms of weights
    assert step_seconds(M, F, 4000, 0) == pytest.approx(1e-3 + 4e-2 + 8e-3)
    # prefill of 512: max(2 ms weights, 2 * 5e8 * 512 / 0.5e15 = 1.024 ms) + 1 ms
    assert prefill_seconds(M, F, 512) == pytest.approx(3e-3)
    big = prefill_seconds(M, F, 8192)  # compute-bound: 16.384 ms + 1 ms
    assert big == pytest.approx(17.384e-3)


def test_calibrated_steps_interpolate_the_measurements():
    cal = Calibration(context=512, prompt_tokens=512, decode=[(1, 4e-3), (64, 6e-3), (256, 9e-3)],
                      prefill=[(1, 10e-3), (65, 14e-3)])
    m = Machine(1e12, 1e15, 3.0, eta_bw=0.5, calibration=cal)
    assert step_seconds(m, F, 32.5, 512) == pytest.approx(5e-3)      # halfway 1..64
    assert step_seconds(m, F, 512, 512) == pytest.approx(13e-3)      # 256.. extends the slope
    # 64 more tokens of context for 10 sequences: 64e6 bytes at 0.5e12 B/s = 0.128 ms
    assert step_seconds(m, F, 10, 576) == pytest.approx(4e-3 + 2e-3 * 9 / 63 + 0.128e-3)
    assert prefill_seconds(m, F, 256, 129) == pytest.approx(18e-3 / 2)  # extended; half the tokens
    assert interpolate([(1, 7.0)], 100) == 7.0
    back = Calibration.from_dict(json.loads(json.dumps(cal.as_dict())))
    assert back == cal


def test_poisson_quantiles_by_hand():
    # Poisson(1): P(X <= 3) = 0.981, P(X <= 4) = 0.996; Poisson(10): P(X <= 17) = 0.986,
    # P(X <= 18) = 0.993; Poisson(0.125): P(X = 0) = 0.882, P(X <= 1) = 0.993
    assert [poisson_quantile(0.99, x) for x in (0, 1, 10, 0.125)] == [0, 4, 18, 1]
    assert poisson_quantile(0.99, 1000) == 1074  # normal approximation: 1000 + 2.326 * 31.6


def test_light_load_is_one_sequence_at_a_time():
    p = predict(M, F, 1e-6, prompt=512, output=128, max_seqs=64)
    step = step_seconds(M, F, 1, 512 + 64)
    prefill = prefill_seconds(M, F, 512)
    assert p.concurrency == pytest.approx(1.0)
    assert p.tpot_ms == pytest.approx(step * 1000, rel=1e-6)
    assert p.tpot_p99_ms == pytest.approx(step * 1000, rel=1e-6)  # no prompt joins its steps
    assert p.ttft_ms == pytest.approx((1.5 * step + prefill) * 1000, rel=1e-5)
    assert p.ttft_p99_ms == pytest.approx((2 * step + prefill) * 1000, rel=1e-5)


def test_a_loaded_prediction_by_hand():
    # Steps of 10 ms whatever the batch, each prompt adding 20 ms, no K/V term: at 10 rps
    # the prompts take 0.2 of each second, so TPOT = 10 / 0.8 = 12.5 ms. 0.125 prompts
    # arrive per step: 1 - e^-0.125 = 0.1175 of the steps have one, lasting on average
    # 10 + 20 * 0.125 / 0.1175 = 31.28 ms; an arrival waits out the rest of the step in
    # progress, E[S^2] / 2E[S] = (0.8825 * 10^2 + 0.1175 * 31.28^2) / 25 = 8.13 ms, then its
    # own step: TTFT = 8.13 + 10 + 20 * (1 + 0.0625) = 39.38 ms.
    cal = Calibration(512, 512, decode=[(1, 0.01), (256, 0.01)], prefill=[(1, 0.02), (256, 0.02)])
    m = Machine(1e12, 1e15, 3.0, calibration=cal)
    f = ModelFigures(1e9, 5e8, kv_bytes_per_token=0)
    p = predict(m, f, 10, prompt=512, output=128, max_seqs=256)
    assert (p.tpot_ms, p.ttft_ms) == (pytest.approx(12.5), pytest.approx(39.378, abs=1e-3))
    assert p.concurrency == pytest.approx(10 * (p.ttft_ms + 128 * 12.5) / 1000)
    # p99 TPOT: the prompts joining a request's 127 steps (lifetime 1.5875 s: Poisson 15.875)
    joined = poisson_quantile(0.99, 10 * 127 * 0.0125)
    assert p.tpot_p99_ms == pytest.approx((127 * 10 + joined * 20) / 127)
    # p99 TTFT: 1 other prompt in the step in progress and 1 in its own: 2 * 10 + 3 * 20
    assert p.ttft_p99_ms == pytest.approx(80.0)
    assert p.stable and not predict(m, f, 50, 512, 128, 256).stable  # prompts need 100%


def test_prompts_arriving_together_share_a_step():
    # The first prompt in a step adds 20 ms, each further one 5 ms (15 ms shared): the mean
    # step S solves S = 10 + (1 - e^(-rS)) 15 + r S 5 ms, and is shorter than without sharing.
    shared = Calibration(512, 512, decode=[(1, 0.01)], prefill=[(1, 0.02)], prefill_each=0.005)
    alone = Calibration(512, 512, decode=[(1, 0.01)], prefill=[(1, 0.02)])
    f = ModelFigures(1e9, 5e8, kv_bytes_per_token=0)
    p = predict(Machine(1e12, 1e15, 3.0, calibration=shared), f, 20, 512, 128, 256)
    s = p.tpot_ms / 1000
    assert s == pytest.approx(0.01 + (1 - math.exp(-20 * s)) * 0.015 + 20 * s * 0.005)
    assert p.tpot_ms < predict(Machine(1e12, 1e15, 3.0, calibration=alone), f, 20, 512, 128,
                               256).tpot_ms


def test_a_draft_divides_the_step_by_tau_and_multiplies_its_cost():
    spec = ModelFigures(1e9, 5e8, 1e5, tau=3.0, step_cost=1 + 4 * 0.1)
    plain = predict(M, F, 1e-6, 512, 128, 64)
    fast = predict(M, spec, 1e-6, 512, 128, 64)
    assert fast.tpot_ms == pytest.approx(plain.tpot_ms * 1.4 / 3.0, rel=1e-6)


def test_max_rps_meets_its_limits_and_tighter_limits_give_less():
    loose = max_rps(M, F, 512, 128, 256, tpot_ms=50)
    tight = max_rps(M, F, 512, 128, 256, tpot_ms=10)
    assert 0 < tight.rps < loose.rps
    assert tight.tpot_p99_ms <= 10 + 1e-9 and tight.stable
    # Little's law holds at the answer
    assert tight.concurrency == pytest.approx(
        tight.rps * (tight.ttft_ms + 128 * tight.tpot_ms) / 1000, rel=1e-3)
    assert max_rps(M, F, 512, 128, 256, tpot_ms=1).rps == 0  # one step alone is 3.8 ms


def test_replicas_and_dollars():
    assert replicas(1000, 410) == 3 and replicas(400, 410) == 1 and replicas(5, 0) is None
    # $3/h at 1,000 tok/s: 3 / 3600 / 1000 * 1e6 = $0.8333 per million
    assert usd_per_million_tokens(3.0, 1000) == pytest.approx(0.83333, abs=1e-4)


def test_tune_records_the_decision_and_exits_4_when_enforced(build_for, example, tmp_path):
    bundle = build_for("h200-fp8")
    m = json.loads((bundle / "manifest.json").read_text())
    tuning = json.loads((bundle / "reports" / "tuning.json").read_text())
    sizes = [c["max_num_seqs"] for c in tuning["candidates"]]
    assert sizes[0] == 1 and sizes == sorted(sizes) and sizes[-1] >= m["kv_cache"]["max_num_seqs"]
    assert m["kv_cache"]["max_num_seqs"] == tuning["chosen"]["max_num_seqs"]
    assert tuning["predicted"]["max_rps"] == max(c["max_rps"] for c in tuning["candidates"])
    assert m["slo"]["predicted"]["usd_per_million_output_tokens"] > 0
    assert (bundle / "reports" / "tuning.png").is_file()
    bf = write_buildfile(tmp_path / "bf", example, **{"evaluation.samples": 16,
                                                      "slo.target_latency_ms": 0.5,
                                                      "slo.enforce": True})
    result = dwc("build", bf, "-t", "h200-fp8", "-o", tmp_path / "out")
    assert_clean_error(result, 4, "p99 TPOT", "> 0.5 ms")
    assert not (tmp_path / "out").exists()


def test_prompt_costs_fit_the_logged_steps():
    from dwc.perf.calibration import fit_prompt_costs

    decode = [(1, 0.004), (65, 0.008)]                    # 4 ms + 1/16 ms per sequence
    # steps (seconds, sequences, prompts) around a decode step of the other rows: one
    # prompt 30 and 36 ms (mean 33), each further prompt 5 ms (timed alone)
    rows = [(0.004 + 0.030, 1 + 1, 1), (0.008 + 0.036, 65 + 1, 1),
            (0.004 + 0.033 + 0.005, 1 + 2, 2), (0.004 + (0.033 + 0.010) * 1.2, 1 + 3, 3),
            (0.005, 17, 0)]
    first, spread = fit_prompt_costs(rows, decode, each=0.005)
    assert first == pytest.approx(0.033)                  # mean of the one-prompt steps
    assert len(spread) == 20 and spread == sorted(spread)
    assert spread[0] == pytest.approx(30 / 33, abs=1e-4) and spread[-1] == pytest.approx(1.2)


def test_simulation_agrees_with_the_closed_form_means_and_has_longer_tails():
    from dwc.perf.loadsim import check_rate, simulate

    cal = Calibration(512, 512, decode=[(1, 0.005), (256, 0.015)], prefill=[(1, 0.03)],
                      prefill_each=0.002, prefill_spread=[0.8, 1.0, 1.2])
    m = Machine(1e12, 1e15, 3.0, calibration=cal)
    f = ModelFigures(1e9, 5e8, kv_bytes_per_token=0)
    sim, p = simulate(m, f, 10, 512, 128, 256), predict(m, f, 10, 512, 128, 256)
    assert sim.tpot_ms == pytest.approx(p.tpot_ms, rel=0.15)
    assert sim.tpot_p99_ms > sim.tpot_ms and sim.ttft_p99_ms > sim.ttft_ms
    assert simulate(m, f, 10, 512, 128, 256) == sim  # seeded: builds stay reproducible
    # a limit between the p99s at 10 and 20 rps: the check backs 20 rps off below it
    limit = (sim.tpot_p99_ms + simulate(m, f, 20, 512, 128, 256).tpot_p99_ms) / 2
    checked, at, met = check_rate(m, f, 20, 512, 128, 256, tpot_ms=limit, ttft_ms=None)
    assert met and 10 < checked.rps < 20 and at.tpot_p99_ms <= limit
    # a limit no rate meets (below one decode step): not met, and says the last rate tried
    _, at, met = check_rate(m, f, 20, 512, 128, 256, tpot_ms=1.0, ttft_ms=None)
    assert not met and at.tpot_p99_ms > 1.0
    # fewer sequences allowed: arrivals queue for a slot, so TTFT grows
    assert simulate(m, f, 10, 512, 128, 8).ttft_p99_ms > 2 * sim.ttft_p99_ms


def test_calibration_times_the_engine(bundle):
    """The figures exist, are positive, and feed the model (on the H200 they are checked
    against measurement by benchmarks/costmodel_gpu.py)."""
    from dwc.perf.calibration import calibrate
    from dwc.runtime.engine import Engine, EngineConfig

    engine = Engine.from_bundle(bundle, EngineConfig(max_num_seqs=8, num_blocks=256))
    cal = calibrate(engine, prompt_tokens=32, output_tokens=8, sizes=[1, 4])
    assert [n for n, _ in cal.decode] == [1, 4] and all(t > 0 for _, t in cal.decode)
    # measured, not the clamps' floors: a prompt costs time, 8 prompts more than one, and
    # the logged prompt steps lie around the fit
    assert cal.prefill[0][1] > 1e-5 and cal.prefill_each > 0
    assert len(cal.prefill_spread) == 20 and 0.5 < cal.prefill_spread[10] < 2
    assert cal.device == ("cpu" if engine.runner.device == "cpu" else
                          __import__("torch").cuda.get_device_name(0))
    assert not engine.has_work()
    assert engine.blocks.num_free == len(engine.blocks.blocks)  # nothing leaked
    assert type(engine.scheduler).schedule is engine.scheduler.schedule.__func__  # unhooked
    p = predict(Machine(1e12, 1e15, 3.0, calibration=cal), F, 1.0, 32, 8, 8)
    assert p.tpot_ms > 0 and p.ttft_ms > p.tpot_ms


def test_a_confirming_run_that_falls_behind_is_reported(bundle):
    """tune's confirmation (run on the target's GPU) with an engine here: a rate the engine
    cannot keep up with is not confirmed, and with an SLO the build says it is not met."""
    from types import SimpleNamespace

    from dwc.passes.tune import TuneOptions, _confirm
    from dwc.runtime.engine import Engine, EngineConfig

    engine = Engine.from_bundle(bundle, EngineConfig(max_num_seqs=4, num_blocks=256))
    tuning = {"meets_slo": True, "reason": None}
    best = {"max_rps": 2000.0, "max_num_seqs": 4, "draft": False,
            "at_max_rps": {"ttft_ms": 1.0, "tpot_ms": 1.0}}
    slo = SimpleNamespace(target_latency_ms=1000.0, target_ttft_ms=None, target_rps=None)
    _confirm(engine, tuning, best, slo, prompt=16, output=4,
             options=TuneOptions(confirm_requests=40, warmup_requests=10))
    assert tuning["confirmed"] is False and tuning["meets_slo"] is False
    assert "requests completed at" in tuning["reason"]
    assert tuning["measured"]["completed_rps_while_arriving"] < 1800


def test_tune_counts_a_draft_step_k_times():
    """A step with a draft costs tune 1 + K c target steps (verification as a plain step)."""
    from types import SimpleNamespace

    import torch

    from passes.tune import _figures

    def ctx(draft):
        model = torch.nn.Linear(4, 4, bias=False)
        return SimpleNamespace(artifacts=SimpleNamespace(
            draft=draft, quantized=SimpleNamespace(summary={"weight_bytes": 100}), model=model))

    plan = {"bytes_per_token": 10}
    base = {"method": "eagle", "k": 3, "cost_ratio": 0.1, "mean_accepted_tokens": 2.0}
    assert _figures(ctx(base), plan, draft=True).step_cost == pytest.approx(1.3)
    assert _figures(ctx(base), plan, draft=False).step_cost == 1.0
