"""The keep rule: a one-sided t-test of a change's val_bpb against the frontier's.

sigma is the spread of val_bpb between seeds of unchanged code: the pooled within-commit standard
deviation of the baseline rows, with dof = sum(n_i - 1) degrees of freedom. A change measured n
times is compared with the frontier measured m times; delta = mean(new) - mean(ref) has standard
deviation sigma_d = sigma * sqrt(1/n + 1/m), and the change is kept when
    t = delta / sigma_d < -t_{1-alpha, dof}        (lower val_bpb is better).
sigma comes from the baseline alone, and under normal noise a sample's variance is independent of
its mean (and of runs made later), so for a no-op change t follows Student's t with the baseline's
dof exactly: the rule keeps a no-op with probability alpha. The old rule (a z-test, `delta <
-k * sigma_d`, k = 2) ignored that sigma is itself an estimate from a handful of runs: with the
2 or 3 baseline runs it allowed, t has 1 or 2 dof and k = 2 keeps 15% or 9% of no-op changes, not
the 2.3% of the normal table (tests/test_auto_stats.py measures both).

A marginal keep (within one sigma_d beyond the threshold) is measured again with a new seed and
decided again on all runs, up to `repeat_near` times; see sequential_decide for why this can only
lower the false-keep rate.

Measured (simulate_false_keeps: no-op changes, 5 baseline runs, alpha 0.01, seed 0, 200000 trials;
numpy 2.4.6, 2026-12-03; tests/test_auto_stats.py recomputes these digits):
    repeat_near 0: 1960 kept = 0.00980   (binomial sd 0.00022: at alpha, as the t-test promises)
    repeat_near 1: 1224 kept = 0.00612   (the re-measured marginal keeps mostly turn to discards)
"""
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
import scipy.stats

# 5 baseline runs give 4 dof: t_{0.99,4} = 3.75, against 6.96 at 3 runs, so a real gain half as large is kept.
DEFAULT_BASELINES = 5
# 3 runs (2 dof, t_{0.99,2} = 6.96) is the fewest that leaves a keep reachable; 2 runs (1 dof) need t < -31.8.
MIN_BASELINES = 3
# A no-op change is kept once in 100 experiments, i.e. about once in a long session, not once an hour.
DEFAULT_ALPHA = 0.01


@dataclass(frozen=True)
class Decision:
    verdict: str    # "keep" | "discard"
    delta: float    # mean(new) - mean(ref)
    sigma_d: float  # standard deviation of delta: sigma * sqrt(1/n + 1/m)
    t: float        # delta / sigma_d
    t_crit: float   # keep when t < -t_crit
    near: bool      # a marginal keep, -t_crit - 1 <= t < -t_crit: measure again before trusting it


def noise_sigma(groups: dict[str, list[float]]) -> tuple[float | None, int]:
    """Pooled within-group standard deviation over baseline groups (commit -> val_bpb values) and
    its degrees of freedom, sum(n_i - 1); (None, 0) when there are none."""
    groups = [g for g in groups.values() if g]
    dof = sum(len(g) - 1 for g in groups)
    if dof < 1:
        return None, 0
    ss = sum((x - sum(g) / len(g)) ** 2 for g in groups for x in g)
    return math.sqrt(ss / dof), dof


@lru_cache(maxsize=None)
def threshold(dof: int, alpha: float) -> float:
    """The one-sided critical value t_{1-alpha, dof}."""
    if dof < 1 or not 0 < alpha < 0.5:
        raise ValueError(f"threshold needs dof >= 1 and 0 < alpha < 0.5, got dof={dof}, alpha={alpha}")
    return float(scipy.stats.t.ppf(1 - alpha, dof))


def decide(new: list[float], ref: list[float], sigma: float, dof: int, alpha: float) -> Decision:
    """Keep `new` over `ref` when its mean val_bpb is lower by more than t_{1-alpha, dof} * sigma_d."""
    delta = sum(new) / len(new) - sum(ref) / len(ref)
    sigma_d = sigma * math.sqrt(1 / len(new) + 1 / len(ref))
    t, t_crit = delta / sigma_d, threshold(dof, alpha)
    return Decision("keep" if t < -t_crit else "discard", delta, sigma_d, t, t_crit, -t_crit - 1 <= t < -t_crit)


def sequential_decide(measure: Callable[[], float], ref: list[float], sigma: float, dof: int, alpha: float,
                      repeat_near: int) -> tuple[Decision, list[float]]:
    """Measure once and decide; while the decision is a marginal keep and fewer than `repeat_near`
    extra runs were made, measure again and decide on all runs. Returns the last decision and the
    values measured. A run that fails should raise out of `measure`.

    Why this cannot raise the false-keep rate above alpha: a second run is made only after a keep,
    and a clear keep or any discard ends the procedure, so every final keep is a keep of the first
    decision: P(final keep) <= P(first decision keeps) = alpha for a no-op change. Re-measuring
    only ever turns a marginal keep into a discard (or confirms it), never a discard into a keep;
    it trades a little power for fewer false keeps, which is the direction we want."""
    values = [measure()]
    d = decide(values, ref, sigma, dof, alpha)
    while d.near and len(values) - 1 < repeat_near:
        values.append(measure())
        d = decide(values, ref, sigma, dof, alpha)
    return d, values


def simulate_false_keeps(trials: int, baseline_runs: int, alpha: float, repeat_near: int, seed: int) -> float:
    """The fraction of no-op changes kept. Each trial draws `baseline_runs` N(0,1) values of one
    commit (the frontier: they are both its scores and, through their sample std, sigma), then runs
    sequential_decide with runs drawn from N(0,1) too."""
    rng = np.random.default_rng(seed)
    kept = 0
    for _ in range(trials):
        ref = rng.standard_normal(baseline_runs).tolist()
        sigma, dof = noise_sigma({"frontier": ref})
        d, _ = sequential_decide(lambda: float(rng.standard_normal()), ref, sigma, dof, alpha, repeat_near)
        kept += d.verdict == "keep"
    return kept / trials
