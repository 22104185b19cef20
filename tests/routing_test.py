"""Properties of the pure routing functions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phds_jax.model import routing


def _probs(seed=0, tokens=16, experts=8):
  logits = jax.random.normal(jax.random.key(seed), (tokens, experts)) * 3
  return logits, routing.router_probs(logits)


def test_router_probs_are_float32_softmax():
  logits, probs = _probs()
  probs16 = routing.router_probs(logits.astype(jnp.bfloat16))
  assert probs.dtype == jnp.float32 and probs16.dtype == jnp.float32
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_hard_top_k_picks_the_largest_probabilities(k):
  _, probs = _probs()
  r = routing.route(probs, k=k, width=k, norm_topk_prob=False)
  expected = np.sort(np.asarray(probs), axis=-1)[:, ::-1][:, :k]
  np.testing.assert_allclose(r.weights, expected, rtol=1e-6)
  assert r.experts.shape == (16, k) and bool(r.selected.all())
  normed = routing.route(probs, k=k, width=k, norm_topk_prob=True)
  np.testing.assert_allclose(normed.weights.sum(-1), 1.0, rtol=1e-6)


def test_traced_k_masks_ranks_beyond_k_per_token():
  _, probs = _probs()
  k_tok = jnp.array([1, 2, 3, 4] * 4, jnp.int32)
  r = routing.route(probs, k=k_tok, width=4, norm_topk_prob=True)
  nonzero = np.asarray(r.weights > 0).sum(-1)
  np.testing.assert_array_equal(nonzero, k_tok)
  for k in (1, 2, 3, 4):
    static = routing.route(probs, k=k, width=k, norm_topk_prob=True)
    rows = np.asarray(k_tok) == k
    np.testing.assert_allclose(np.asarray(r.weights)[rows, :k], np.asarray(static.weights)[rows], rtol=1e-6)


def test_soft_mask_gives_eps_to_ranks_beyond_k_and_keeps_gradients():
  logits, _ = _probs()

  def weights(logits, eps):
    probs = routing.router_probs(logits)
    return routing.route(probs, k=2, width=4, norm_topk_prob=False, soft_mask_eps=eps).weights

  w = np.asarray(weights(logits, 1e-6))
  np.testing.assert_array_equal(w[:, 2:], np.float32(1e-6))
  grad = jax.grad(lambda l: weights(l, 1e-6)[:, :2].sum())(logits)
  assert np.abs(np.asarray(grad)).max() > 0


def test_compute_width():
  assert routing.compute_width(k_static=2, k_max=None, k_pre=8, soft_mask_eps=None) == 2
  assert routing.compute_width(k_static=2, k_max=None, k_pre=8, soft_mask_eps=1e-6) == 8
  assert routing.compute_width(k_static=None, k_max=4, k_pre=8, soft_mask_eps=None) == 4
  assert routing.compute_width(k_static=None, k_max=4, k_pre=2, soft_mask_eps=1e-6) == 4
  with pytest.raises(ValueError, match="k_max"):
    routing.compute_width(k_static=None, k_max=None, k_pre=2, soft_mask_eps=None)


def test_load_balance_loss_matches_transformers_formula():
  import torch
  from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

  layers = [_probs(seed) for seed in range(3)]
  for k in (1, 2, 5):
    stats = []
    for logits, probs in layers:
      stats.append(routing.router_stats(logits, probs, routing.route(probs, k=k, width=k, norm_topk_prob=False)))
    ours = routing.load_balance_loss(routing.combine_stats(jax.tree.map(lambda *s: jnp.stack(s), *stats)))
    ref = load_balancing_loss_func(tuple(torch.tensor(np.asarray(l)) for l, _ in layers), 8, k)
    np.testing.assert_allclose(float(ours), float(ref), rtol=1e-5)


def test_load_balance_loss_with_padding_mask_matches_transformers():
  import torch
  from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

  logits, probs = _probs(tokens=12)
  mask = np.array([1] * 9 + [0] * 3, np.int32)
  stats = routing.router_stats(logits, probs, routing.route(probs, k=2, width=2, norm_topk_prob=False),
                               jnp.asarray(mask))
  ref = load_balancing_loss_func((torch.tensor(np.asarray(logits)),), 8, 2,
                                 torch.tensor(mask).reshape(1, 12))
  np.testing.assert_allclose(float(routing.load_balance_loss(stats)), float(ref), rtol=1e-5)


def test_z_loss_is_mean_squared_logsumexp():
  logits, probs = _probs()
  stats = routing.router_stats(logits, probs, routing.route(probs, k=1, width=1, norm_topk_prob=False))
  expected = np.mean(np.square(jax.nn.logsumexp(logits, axis=-1)))
  np.testing.assert_allclose(float(routing.router_z_loss(stats)), expected, rtol=1e-6)


def test_gumbel_routing_samples_sets_without_replacement_from_the_router():
  """Roster of Experts: with tau = 1, the chosen pair of experts follows sampling without replacement from
  the router's probabilities (chi-square over the 10 pairs of 5 experts, fixed seed); tau = 0 tokens are
  routed exactly as without noise, weights are the chosen experts' probabilities."""
  from scipy import stats as scipy_stats

  tokens, p = 20000, np.array([0.4, 0.25, 0.15, 0.12, 0.08])
  logits = jnp.broadcast_to(jnp.log(jnp.asarray(p, jnp.float32)), (tokens, 5))
  probs = routing.router_probs(logits)
  tau = jnp.ones((tokens,), jnp.float32)
  r = routing.route(probs, k=2, width=2, norm_topk_prob=False,
                    scores=routing.gumbel_scores(logits, probs, tau, jax.random.key(0)))
  chosen = np.sort(np.asarray(r.experts), axis=-1)
  pairs = [(i, j) for i in range(5) for j in range(i + 1, 5)]
  observed = np.array([np.sum((chosen[:, 0] == i) & (chosen[:, 1] == j)) for i, j in pairs])
  expected = tokens * np.array([p[i] * p[j] / (1 - p[i]) + p[j] * p[i] / (1 - p[j]) for i, j in pairs])
  assert scipy_stats.chisquare(observed, expected).pvalue > 0.01
  np.testing.assert_allclose(np.asarray(r.weights), p[np.asarray(r.experts)], rtol=1e-6)
  # tau = 0 rows (and tau = 0 everywhere) are today's routing, bit for bit
  _, probs8 = _probs()
  tau_rows = jnp.array([0.0, 1.0] * 8, jnp.float32)
  noisy = routing.route(probs8, k=2, width=3, norm_topk_prob=True, soft_mask_eps=1e-6,
                        scores=routing.gumbel_scores(jnp.log(probs8), probs8, tau_rows, jax.random.key(1)))
  plain = routing.route(probs8, k=2, width=3, norm_topk_prob=True, soft_mask_eps=1e-6)
  for field in ("experts", "weights", "selected"):
    np.testing.assert_array_equal(np.asarray(getattr(noisy, field))[::2], np.asarray(getattr(plain, field))[::2])
  assert not np.array_equal(np.asarray(noisy.experts)[1::2], np.asarray(plain.experts)[1::2])
