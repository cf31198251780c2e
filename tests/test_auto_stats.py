"""The keep rule's statistics: pooled sigma, the t threshold, decide on hand cases, and the false-keep
rate of no-op changes measured by simulation (against alpha, and the old z-test's for the record)."""
import math
import re
import statistics

import numpy as np
import pytest
import scipy.stats

from llmlabs.auto import stats
from llmlabs.auto.stats import decide, noise_sigma, sequential_decide, simulate_false_keeps, threshold


def test_noise_sigma_is_pooled_within_group_std():
    # by hand: a = 1, 2, 3 (mean 2, ss 2), b = 10, 14 (mean 12, ss 8): sqrt(10 / 3) with 3 dof
    sigma, dof = noise_sigma({"a": [1.0, 2.0, 3.0], "b": [10.0, 14.0]})
    assert dof == 3 and sigma == pytest.approx(math.sqrt(10 / 3), rel=1e-12)
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.5, 0.02, 5), rng.normal(1.3, 0.05, 3)
    ref = math.sqrt((np.var(a, ddof=1) * 4 + np.var(b, ddof=1) * 2) / 6)
    assert noise_sigma({"a": list(a), "b": list(b)}) == (pytest.approx(ref, rel=1e-12), 6)
    assert noise_sigma({"a": list(a)})[0] == pytest.approx(statistics.stdev(a), rel=1e-12)
    assert noise_sigma({"a": [1.0], "b": [2.0]}) == (None, 0) and noise_sigma({}) == (None, 0)


def test_threshold_matches_the_t_table():
    assert threshold(4, 0.01) == pytest.approx(3.7469, abs=1e-4)
    assert threshold(2, 0.01) == pytest.approx(6.9646, abs=1e-4)
    assert threshold(10, 0.05) == pytest.approx(1.8125, abs=1e-4)
    assert threshold(1, 0.01) == pytest.approx(31.8205, abs=1e-4)
    with pytest.raises(ValueError):
        threshold(0, 0.01)


def test_decide_by_hand():
    # ref mean 1.0, sigma 0.01, n = 1, m = 4: sigma_d = 0.01 * sqrt(1.25); dof 4: t_crit 3.7469
    sd = 0.01 * math.sqrt(1.25)
    ref = [0.99, 1.0, 1.0, 1.01]
    clear = decide([1.0 - 5 * sd], ref, 0.01, 4, 0.01)
    assert clear.verdict == "keep" and not clear.near
    assert clear.delta == pytest.approx(-5 * sd) and clear.sigma_d == pytest.approx(sd) and clear.t == pytest.approx(-5)
    assert clear.t_crit == pytest.approx(3.7469, abs=1e-4)
    marginal = decide([1.0 - 4 * sd], ref, 0.01, 4, 0.01)
    assert marginal.verdict == "keep" and marginal.near
    short = decide([1.0 - 3.7 * sd], ref, 0.01, 4, 0.01)  # just short of the threshold: discard, never re-run
    assert short.verdict == "discard" and not short.near
    worse = decide([1.02, 1.03], ref, 0.01, 4, 0.01)
    assert worse.verdict == "discard" and not worse.near and worse.delta == pytest.approx(0.025)
    assert worse.sigma_d == pytest.approx(0.01 * math.sqrt(1 / 2 + 1 / 4))


def test_sequential_decide_re_measures_only_marginal_keeps():
    sd1 = 0.01 * math.sqrt(1 + 1 / 4)
    ref = [1.0] * 4

    def feed(values):
        it = iter(values)
        return lambda: next(it)

    # marginal keep, then a second run at the reference: decided on both, a discard
    d, vals = sequential_decide(feed([1.0 - 4 * sd1, 1.0]), ref, 0.01, 4, 0.01, repeat_near=3)
    assert vals == [1.0 - 4 * sd1, 1.0] and d.verdict == "discard"
    # marginal keep confirmed by a clearly better second run: a keep on the mean of both
    d, vals = sequential_decide(feed([1.0 - 4 * sd1, 1.0 - 8 * sd1]), ref, 0.01, 4, 0.01, repeat_near=3)
    assert len(vals) == 2 and d.verdict == "keep" and not d.near
    # marginal keeps all the way (the mean of n runs at t = -4): stops after repeat_near extra runs
    mean_delta = [-4 * 0.01 * math.sqrt(1 / n + 1 / 4) for n in range(1, 10)]
    marginal = [1.0 + mean_delta[0]] + [1.0 + (n + 1) * mean_delta[n] - n * mean_delta[n - 1] for n in range(1, 9)]
    d, vals = sequential_decide(feed(marginal), ref, 0.01, 4, 0.01, repeat_near=2)
    assert len(vals) == 3 and d.verdict == "keep" and d.near and d.t == pytest.approx(-4)
    # a clear keep, a discard, or repeat_near 0: one run
    for first, rn in ((1.0 - 6 * sd1, 3), (1.0 - 3 * sd1, 3), (1.0 - 4 * sd1, 0)):
        assert len(sequential_decide(feed([first, 1.0]), ref, 0.01, 4, 0.01, repeat_near=rn)[1]) == 1


DOCSTRING_RUN = re.compile(r"simulate_false_keeps: no-op changes, (\d+) baseline runs, alpha ([\d.]+), seed (\d+), "
                           r"(\d+) trials")
DOCSTRING_RATE = re.compile(r"repeat_near (\d+): (\d+) kept = ([\d.]+)")


def test_false_keep_rate_of_no_op_changes_is_at_most_alpha_and_matches_the_docstring():
    """Recomputes the rates stated in stats.py's docstring with its seed: the digits must match,
    and each rate must sit within 4 binomial sd of alpha (repeat_near 0) or below it."""
    runs, alpha, seed, trials = DOCSTRING_RUN.search(stats.__doc__.replace("\n", " ")).groups()
    runs, alpha, seed, trials = int(runs), float(alpha), int(seed), int(trials)
    stated = DOCSTRING_RATE.findall(stats.__doc__)
    assert [int(r) for r, _, _ in stated] == [0, 1] and runs == 5 and alpha == 0.01 and trials >= 20_000
    band = 4 * math.sqrt(alpha * (1 - alpha) / trials)
    for repeat_near, count, rate in stated:
        measured = simulate_false_keeps(trials, runs, alpha, int(repeat_near), seed)
        print(f"\nno-op changes kept: {measured:.5f} ({trials} trials, {runs} baseline runs, alpha {alpha}, "
              f"repeat_near {repeat_near}, seed {seed}); 4 sd band {band:.5f}")
        assert round(measured * trials) == int(count) and f"{measured:.5f}" == rate, "stats.py's docstring is stale"
        assert measured <= alpha + band
        if repeat_near == "0":
            assert measured >= alpha - band


@pytest.mark.parametrize("runs,expected", [(2, 0.148), (3, 0.092)])
def test_old_z_rule_keeps_far_more_no_ops_than_it_claims(runs, expected):
    """For the record: the old rule kept a change when t < -2 (a z-test, k = 2, claimed ~2%), with
    sigma from as few as 2 baseline runs. That is decide with alpha = P(t_dof < -2), no repeats."""
    trials = 20_000
    rate = simulate_false_keeps(trials, runs, float(scipy.stats.t.sf(2, runs - 1)), 0, seed=1)
    print(f"\nold rule (z-test k=2, {runs} baseline runs, {runs - 1} dof): {rate:.4f} of no-ops kept ({trials} trials)")
    assert rate > 0.05 and rate == pytest.approx(expected, abs=4 * math.sqrt(expected * (1 - expected) / trials))
