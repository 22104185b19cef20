"""The study's statistics: paired bootstrap intervals, Holm's correction, Cohen's kappa and power, against
hand-computed values and the normal theory they approximate."""

import math

import numpy as np
import pytest

from experiments import inference


def test_bootstrap_interval_matches_normal_theory_and_pools_seeds():
  rng = np.random.default_rng(0)
  by_seed = {s: rng.normal(0.05, 1.0, 1500) for s in range(3)}
  c = inference.paired(by_seed)
  pooled = np.concatenate(list(by_seed.values()))
  half = 1.96 * pooled.std() / math.sqrt(pooled.size)
  assert c.n == 4500 and c.seeds == 3 and c.mean == pytest.approx(pooled.mean())
  assert c.low == pytest.approx(pooled.mean() - half, abs=0.1 * half)
  assert c.high == pytest.approx(pooled.mean() + half, abs=0.1 * half)
  z = pooled.mean() / (pooled.std() / math.sqrt(pooled.size))
  assert c.p == pytest.approx(math.erfc(z / math.sqrt(2)), rel=0.25)  # the two-sided normal p (0.008)
  assert c.p < 0.05 and c.verdict(+1) == "holds" and c.verdict(-1) == "contradicted"
  assert c.verdict(0) == "differs"


def test_no_difference_is_inconclusive_and_constant_differences_are_certain():
  rng = np.random.default_rng(1)
  flat = inference.paired({0: rng.choice([-1.0, 0.0, 1.0], 2000, p=[0.1, 0.8, 0.1])})
  assert flat.low < 0 < flat.high and flat.p > 0.05 and flat.verdict(+1) == "inconclusive"
  same = inference.paired({0: np.full(50, 0.25), 1: np.full(70, 0.25)})
  assert (same.mean, same.low, same.high) == pytest.approx((0.25, 0.25, 0.25))
  assert same.p == 0.0  # every resample the same
  assert inference.paired({0: np.zeros(10)}).p == 1.0
  assert math.isnan(inference.paired({}).mean)


def test_holm_adjusts_step_down_and_verdicts_use_it():
  raw = {"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005}
  comparisons = {name: inference.Comparison(0.1, 0.05, 0.15, p, 100, 1) for name, p in raw.items()}
  adjusted = inference.holm(comparisons)
  assert {name: round(c.p_holm, 6) for name, c in adjusted.items()} == {"d": 0.02, "a": 0.03, "c": 0.06, "b": 0.06}
  assert adjusted["a"].verdict(+1) == "holds" and adjusted["c"].verdict(+1) == "inconclusive"
  assert comparisons["c"].verdict(+1) == "holds"  # before the correction it would have counted


def test_cohen_kappa():
  assert inference.cohen_kappa([0, 0, 1, 1], [0, 1, 1, 1]) == pytest.approx(0.5)
  assert inference.cohen_kappa([3, 1, 2], [3, 1, 2]) == 1.0
  assert inference.cohen_kappa([2, 2, 2], [2, 2, 2]) == 1.0  # constant and equal
  rng = np.random.default_rng(0)
  assert abs(inference.cohen_kappa(rng.integers(0, 10, 20000), rng.integers(0, 10, 20000))) < 0.02
  with pytest.raises(ValueError, match="equally long"):
    inference.cohen_kappa([1, 2], [1])


def test_power():
  z80 = 1.959963984540054 + 0.8416212335729143  # shift giving 80% power
  n = math.ceil((z80 * 0.5 / 0.02) ** 2)
  assert inference.power(0.5, n, 0.02) == pytest.approx(0.80, abs=0.005)
  assert inference.power(0.5, 10, 0.0) == pytest.approx(inference.ALPHA, abs=1e-6)
  assert inference.power(0.5, 10 * n, 0.02) > 0.999


def test_expert_specialisation_summary():
  """Two families on disjoint halves of 4 experts: the family tells 1 bit of the expert's 2 (0.5 of log E);
  the same use for both: nothing."""
  import numpy as np

  from experiments import specialisation

  split = specialisation.summary({"a": np.array([[5.0, 5.0, 0.0, 0.0]]), "b": np.array([[0.0, 0.0, 5.0, 5.0]])})
  assert split["mutual_information"] == [0.5] and split["entropy"] == {"a": [0.5], "b": [0.5]}
  assert split["entropy_pooled"] == [1.0] and sorted(split["top_experts"]["b"][0][:2]) == [2, 3]
  alike = specialisation.summary({"a": np.array([[1.0, 2.0, 3.0, 4.0]]), "b": np.array([[2.0, 4.0, 6.0, 8.0]])})
  assert alike["mutual_information"] == [0.0]
