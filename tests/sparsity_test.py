"""The k schedule: distribution, anchoring, determinism across restarts."""

import collections

import ml_collections
import numpy as np
import pytest

from phds_jax.eval import settings
from phds_jax.train import sparsity


def test_phase_one_matches_the_weights():
  s = sparsity.KSchedule(k_values=(4, 5, 6, 7, 8), weights=(1, 1, 1, 1, 4), seed=3)
  counts = collections.Counter(s.sample(step) for step in range(8000))
  freq = np.array([counts[k] for k in (4, 5, 6, 7, 8)]) / 8000
  np.testing.assert_allclose(freq, [0.125, 0.125, 0.125, 0.125, 0.5], atol=0.02)


def test_uniform_by_default():
  s = sparsity.KSchedule(k_values=(1, 2, 3, 4))
  counts = collections.Counter(s.sample(step) for step in range(4000))
  assert set(counts) == {1, 2, 3, 4} and min(counts.values()) > 850


@pytest.mark.parametrize("shape", ["linear", "cosine", "step"])
def test_anchoring_moves_all_mass_to_the_lowest_k(shape):
  s = sparsity.KSchedule(k_values=(2, 4, 8), anchor_start=100, anchor_steps=50, anchor_shape=shape)
  np.testing.assert_allclose(s.probabilities(0), [1 / 3] * 3)
  np.testing.assert_allclose(s.probabilities(99), [1 / 3] * 3)
  mid = s.probabilities(125)
  assert mid[0] > 1 / 3 or shape == "step"
  np.testing.assert_allclose(mid.sum(), 1.0)
  for step in (150, 151, 10_000):
    np.testing.assert_allclose(s.probabilities(step), [1, 0, 0])
    assert s.sample(step) == 2
  fractions = [s.anchor_fraction(t) for t in range(90, 160)]
  assert fractions == sorted(fractions)  # monotone


def test_anchor_k_override_and_validation():
  s = sparsity.KSchedule(k_values=(2, 4, 8), anchor_start=0, anchor_k=4)
  assert {s.sample(t) for t in range(50)} == {4}
  with pytest.raises(ValueError, match="anchor_k=3 is not in k_values"):
    sparsity.KSchedule(k_values=(2, 4), anchor_k=3)
  with pytest.raises(ValueError, match="duplicates"):
    sparsity.KSchedule(k_values=(2, 2))
  with pytest.raises(ValueError, match="anchor_shape"):
    sparsity.KSchedule(k_values=(2,), anchor_shape="exp")
  with pytest.raises(ValueError, match="weights"):
    sparsity.KSchedule(k_values=(2, 4), weights=(1.0,))


def test_draws_depend_only_on_seed_and_step():
  a = sparsity.KSchedule(k_values=(1, 2, 3, 4), seed=7)
  b = sparsity.KSchedule(k_values=(1, 2, 3, 4), seed=7)
  uninterrupted = [a.sample(t) for t in range(200)]
  resumed = [b.sample(t) for t in range(120, 200)]  # a restart at step 120
  assert resumed == uninterrupted[120:]
  other = sparsity.KSchedule(k_values=(1, 2, 3, 4), seed=8)
  assert [other.sample(t) for t in range(200)] != uninterrupted


def test_per_layer_draws_vary_across_layers():
  s = sparsity.KSchedule(k_values=(1, 2, 3, 4), per_layer=True)
  draws = [s.sample(t, num_moe_layers=6) for t in range(100)]
  assert all(len(d) == 6 for d in draws)
  assert any(len(set(d)) > 1 for d in draws)


def test_one_draw_per_micro_batch_is_seeded_and_follows_the_schedule():
  s = sparsity.KSchedule(k_values=(1, 2, 3, 4), anchor_start=100, seed=3)
  draws = [s.sample(t, draws=4) for t in range(100)]
  assert all(len(d) == 4 for d in draws)
  assert [d[0] for d in draws] == [s.sample(t) for t in range(100)]  # the first is the one-per-step draw
  assert draws == [s.sample(t, draws=4) for t in range(100)]
  assert sum(len(set(d)) > 1 for d in draws) > 50  # micro-batches of a step do differ
  counts = collections.Counter(k for d in draws for k in d)
  assert all(abs(counts[k] / 400 - 0.25) < 0.07 for k in (1, 2, 3, 4))
  assert set(s.sample(150, draws=4)) == {1}  # anchored
  layered = sparsity.KSchedule(k_values=(1, 2), per_layer=True).sample(0, num_moe_layers=3, draws=2)
  assert len(layered) == 2 and all(len(d) == 3 for d in layered)


def test_phase_of_a_step():
  s = sparsity.KSchedule(k_values=(1, 2), anchor_start=8, anchor_steps=2)
  # after `step` optimizer steps: anchoring once the step numbered anchor_start (the 9th) was trained
  assert [s.phase(t) for t in (0, 1, 8, 9, 20)] == ["start", "multi_k", "multi_k", "anchoring", "anchoring"]
  assert sparsity.KSchedule(k_values=(2,)).phase(50) == "fixed_k"  # an oracle's schedule


def test_schedule_from_config_and_parsing():
  phds = ml_collections.ConfigDict(dict(k_values="4,5,6,7,8", k_weights="", anchor=True, anchor_start_frac=0.8,
                                        anchor_ramp_frac=0.1, anchor_shape="linear", anchor_k=0,
                                        per_layer=False, seed=0))
  s = sparsity.schedule_from_config(phds, total_steps=1000)
  assert s.k_values == (4, 5, 6, 7, 8) and s.anchor_start == 800 and s.anchor_steps == 100
  assert s.target_k == 4
  assert settings.parse_numbers((2, 4)) == (2, 4) and settings.parse_numbers(3) == (3,)
  assert settings.parse_numbers("0.5, 1", float) == (0.5, 1.0)
  with pytest.raises(ValueError, match="comma-separated"):
    settings.parse_numbers("2,x")
