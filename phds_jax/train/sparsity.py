"""The k schedule of PHDS training: multi-k sampling, then curriculum anchoring on the lowest k.

Phase 1 draws a global k_train each step from `k_values` with `weights`. Phase 2 (anchoring) starts at
`anchor_start`, moves the sampling distribution to `anchor_k` (default: the lowest k) over
`anchor_steps` following `anchor_shape`, and stays there. Draws come from a generator seeded by
(seed, step), so a run restarted at step s draws exactly what the uninterrupted run drew.
With `per_layer`, every MoE layer draws its own k (Matryoshka-style) from the same distribution.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import numpy as np

from phds_jax.eval.settings import parse_numbers

SHAPES = ("linear", "cosine", "step")


@dataclasses.dataclass(frozen=True)
class KSchedule:
  k_values: tuple[int, ...]
  weights: Optional[tuple[float, ...]] = None  # phase-1 sampling weights (default uniform)
  anchor_start: Optional[int] = None  # first step of anchoring; None: no anchoring
  anchor_steps: int = 0  # length of the shift towards anchor_k (0: switch at anchor_start)
  anchor_shape: str = "linear"  # how the mix moves: "linear", "cosine" or "step" (all at once)
  anchor_k: Optional[int] = None  # the k anchored on; default min(k_values)
  per_layer: bool = False  # draw one k per MoE layer
  seed: int = 0

  def __post_init__(self):
    if not self.k_values or any(not isinstance(k, int) or k < 1 for k in self.k_values):
      raise ValueError(f"k_values={self.k_values} must be a non-empty tuple of positive ints")
    if len(set(self.k_values)) != len(self.k_values):
      raise ValueError(f"k_values={self.k_values} has duplicates")
    if self.weights is not None:
      if len(self.weights) != len(self.k_values) or min(self.weights) < 0 or sum(self.weights) <= 0:
        raise ValueError(f"weights={self.weights} must be {len(self.k_values)} non-negative numbers, not all 0")
    if self.anchor_shape not in SHAPES:
      raise ValueError(f"anchor_shape={self.anchor_shape!r}; choose one of {SHAPES}")
    if self.anchor_start is not None and (self.anchor_start < 0 or self.anchor_steps < 0):
      raise ValueError("anchor_start and anchor_steps must be >= 0")
    if self.anchor_k is not None and self.anchor_k not in self.k_values:
      raise ValueError(f"anchor_k={self.anchor_k} is not in k_values={self.k_values}")

  @property
  def target_k(self) -> int:
    return self.anchor_k if self.anchor_k is not None else min(self.k_values)

  @property
  def k_max(self) -> int:
    return max(self.k_values)

  def anchor_fraction(self, step: int) -> float:
    """0 before anchoring, rising to 1 (all mass on anchor_k) at anchor_start + anchor_steps."""
    if self.anchor_start is None or step < self.anchor_start:
      return 0.0
    if self.anchor_steps == 0 or self.anchor_shape == "step":
      return 1.0
    t = min(1.0, (step - self.anchor_start) / self.anchor_steps)
    return t if self.anchor_shape == "linear" else 0.5 * (1.0 - math.cos(math.pi * t))

  def probabilities(self, step: int) -> np.ndarray:
    """Sampling probabilities over k_values at `step`."""
    base = np.ones(len(self.k_values)) if self.weights is None else np.asarray(self.weights, np.float64)
    base = base / base.sum()
    anchor = np.asarray([k == self.target_k for k in self.k_values], np.float64)
    a = self.anchor_fraction(step)
    return (1.0 - a) * base + a * anchor

  def sample(self, step: int, num_moe_layers: int = 1, draws: Optional[int] = None):
    """k_train at `step`: an int, or with per_layer a tuple with one k per MoE layer; with `draws`=n a list
    of n such values, one per micro-batch (its first is what draws=None gives)."""
    rng = np.random.default_rng([self.seed, step])
    p = self.probabilities(step)
    out: list[Union[int, tuple[int, ...]]] = []
    for _ in range(1 if draws is None else draws):
      picked = rng.choice(len(self.k_values), size=num_moe_layers if self.per_layer else 1, p=p)
      ks = tuple(int(self.k_values[i]) for i in picked)
      out.append(ks if self.per_layer else ks[0])
    return out[0] if draws is None else out

  def phase(self, step: int) -> str:
    """What produced the parameters after `step` optimizer steps: "start" (none yet), "multi_k" (or
    "fixed_k" for a schedule of one k, an oracle), or "anchoring" once a step at or after anchor_start was
    trained."""
    if step == 0:
      return "start"
    if self.anchor_start is not None and step > self.anchor_start:
      return "anchoring"
    return "fixed_k" if len(set(self.k_values)) == 1 else "multi_k"


def schedule_from_config(phds, total_steps: int) -> KSchedule:
  """Builds the schedule from a config's `phds` block; anchor_start/steps given as fractions of training."""
  anchor_start = None
  anchor_steps = 0
  if phds.anchor:
    anchor_start = int(round(phds.anchor_start_frac * total_steps))
    anchor_steps = int(round(phds.anchor_ramp_frac * total_steps))
  weights = parse_numbers(phds.k_weights, float) if phds.k_weights else None
  return KSchedule(k_values=parse_numbers(phds.k_values), weights=weights, anchor_start=anchor_start,
                   anchor_steps=anchor_steps, anchor_shape=phds.anchor_shape,
                   anchor_k=phds.anchor_k or None, per_layer=phds.per_layer, seed=phds.seed)
