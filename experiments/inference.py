"""Statistics that can tell methods apart: paired per-item differences pooled over seeds, bootstrap 95%
intervals, Holm's correction over every verdict of a report, chance-corrected agreement (Cohen's kappa) and
the power to detect a difference. Pure numpy; summarize.py turns them into RESULTS.md.

A comparison is paired by item: both methods answered the same evaluation items of the same seeds, so the
per-item difference (1/0 correctness, or answer NLL) removes the items' difficulty from the noise. The
bootstrap resamples items within each seed (seeds keep their weight), so the interval covers the item
sampling of every seed; the seed-to-seed spread of the fine-tunes is shown beside it in the tables.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

BOOTSTRAP = 2000
ALPHA = 0.05


@dataclasses.dataclass(frozen=True)
class Comparison:
  """A paired difference (method A - method B) pooled over seeds. p: two-sided bootstrap p-value of "no
  difference"; p_holm: after Holm's correction over the family it was tested with (set by `holm`)."""
  mean: float
  low: float
  high: float
  p: float
  n: int
  seeds: int
  p_holm: float = float("nan")

  def verdict(self, expected_sign: int = 0) -> str:
    """"holds" / "contradicted" (significant after Holm, with / against `expected_sign`); "differs"
    (significant, no direction expected); "inconclusive" otherwise."""
    p = self.p if math.isnan(self.p_holm) else self.p_holm
    if not p < ALPHA:
      return "inconclusive"
    if expected_sign == 0:
      return "differs"
    return "holds" if np.sign(self.mean) == expected_sign else "contradicted"

  def fmt(self, digits: int = 3) -> str:
    return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def paired(differences: Mapping[int, Sequence[float]], *, resamples: int = BOOTSTRAP,
           seed: int = 0) -> Comparison:
  """differences: seed -> per-item differences A - B. The mean over all items, the 2.5 / 97.5 percentiles
  of its bootstrap (items resampled with replacement within each seed) and the two-sided p-value of 0 from
  the mean over the bootstrap's standard error (normal; a count of bootstrap draws would floor p at
  1 / resamples, and Holm's correction over ~100 tests would then make nothing significant)."""
  per_seed = [np.asarray(d, np.float64) for _, d in sorted(differences.items()) if len(d)]
  if not per_seed:
    return Comparison(float("nan"), float("nan"), float("nan"), float("nan"), 0, 0)
  rng = np.random.default_rng(seed)
  total = sum(d.size for d in per_seed)
  boot = np.zeros(resamples)
  for d in per_seed:  # each seed's items resampled on their own: sum of resampled sums / all items
    picks = rng.integers(0, d.size, size=(resamples, d.size))
    boot += d[picks].sum(axis=1)
  boot /= total
  mean = float(np.concatenate(per_seed).mean())
  low, high = np.percentile(boot, [2.5, 97.5])
  se = float(boot.std(ddof=1))
  if se > 0:
    p = math.erfc(abs(mean) / se / math.sqrt(2.0))
  else:  # every resample the same: certain
    p = 1.0 if mean == 0 else 0.0
  return Comparison(mean, float(low), float(high), p, total, len(per_seed))


def holm(comparisons: Mapping[str, Comparison]) -> dict[str, Comparison]:
  """Holm's step-down correction over one family of tests: each comparison with p_holm, the smallest p times
  m, the next times m - 1, ..., kept monotone and at most 1. Controls the chance of any false verdict at
  ALPHA over the family, whatever the dependence between the tests."""
  order = sorted((c.p, name) for name, c in comparisons.items() if not math.isnan(c.p))
  out = {name: c for name, c in comparisons.items()}
  running = 0.0
  for rank, (p, name) in enumerate(order):
    running = max(running, min(1.0, p * (len(order) - rank)))
    out[name] = dataclasses.replace(comparisons[name], p_holm=running)
  return out


def cohen_kappa(a: Sequence[int], b: Sequence[int]) -> float:
  """Agreement of two lists of predicted choices corrected for the agreement their marginal frequencies
  give by chance: (observed - chance) / (1 - chance); 1 = identical, 0 = as by chance."""
  a, b = np.asarray(a), np.asarray(b)
  if a.size == 0 or a.shape != b.shape:
    raise ValueError(f"kappa needs two equally long, non-empty lists of predictions ({a.size} vs {b.size})")
  observed = float(np.mean(a == b))
  labels = np.union1d(a, b)
  chance = float(sum(np.mean(a == x) * np.mean(b == x) for x in labels))
  return 1.0 if chance == 1.0 else (observed - chance) / (1.0 - chance)


def power(difference_sd: float, n: int, effect: float = 0.02) -> float:
  """The probability that a paired comparison over `n` items whose per-item differences have standard
  deviation `difference_sd` finds a true mean difference of `effect` (two-sided, level ALPHA; normal
  approximation, before any multiple-test correction)."""
  if n <= 0 or difference_sd <= 0:
    return float("nan")
  shift = abs(effect) / (difference_sd / math.sqrt(n))
  z = 1.959963984540054  # the 97.5% normal quantile
  phi = lambda x: 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))
  return phi(shift - z) + phi(-shift - z)
