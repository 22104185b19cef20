"""Every expert backend equals the reference loop, forward and gradients, at every width."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phds_jax.model import experts as experts_lib
from phds_jax.model import routing

E, H, I, T = 8, 16, 12, 37  # T not a multiple of anything on purpose


def _weights(seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return experts_lib.ExpertWeights(gate=jax.random.normal(ks[0], (E, H, I)) * 0.3,
                                   up=jax.random.normal(ks[1], (E, H, I)) * 0.3,
                                   down=jax.random.normal(ks[2], (E, I, H)) * 0.3)


def _routing(width, seed=1, k=None):
  logits = jax.random.normal(jax.random.key(seed), (T, E)) * 2
  probs = routing.router_probs(logits)
  return routing.route(probs, k=width if k is None else k, width=width, norm_topk_prob=False)


FAST_BACKENDS = ["grouped", "sorted", "ragged"]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("width", [1, 2, 5, E])
def test_backend_equals_reference(backend, width):
  x = jax.random.normal(jax.random.key(2), (T, H))
  w, r = _weights(), _routing(width)
  ref = experts_lib.reference_moe(x, r.experts, r.weights, w)
  out = experts_lib.moe_ffn(x, r.experts, r.weights, w, backend)
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_backend_gradients_equal_reference(backend):
  x = jax.random.normal(jax.random.key(2), (T, H))
  w = _weights()
  r = _routing(4, k=jnp.array([1, 2, 3, 4] * 10)[:T])  # traced-style zero weights included

  def loss(fn):
    return lambda x, w, weights: jnp.sum(jnp.sin(fn(x, r.experts, weights, w)))

  ref = jax.grad(loss(experts_lib.reference_moe), argnums=(0, 1, 2))(x, w, r.weights)
  out = jax.grad(loss(experts_lib.BACKENDS[backend]), argnums=(0, 1, 2))(x, w, r.weights)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("tokens, width", [(1, 1), (1, 8), (3, 2), (2, 8)])
def test_backend_is_exact_for_decode_sized_inputs(backend, tokens, width):
  x = jax.random.normal(jax.random.key(4), (tokens, H))
  w = _weights()
  logits = jax.random.normal(jax.random.key(5), (tokens, E))
  r = routing.route(routing.router_probs(logits), k=width, width=width, norm_topk_prob=True)
  np.testing.assert_allclose(experts_lib.BACKENDS[backend](x, r.experts, r.weights, w),
                             experts_lib.reference_moe(x, r.experts, r.weights, w), atol=1e-5)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("tokens, width", [(T, 2), (300, 3), (300, E)])
def test_backend_handles_the_most_concentrated_routing(backend, tokens, width):
  """Every token on the same experts: the groups exceed any capacity by the most possible."""
  x = jax.random.normal(jax.random.key(3), (tokens, H))
  w = _weights()
  expert_ids = jnp.tile((jnp.arange(width, dtype=jnp.int32) * 5) % E, (tokens, 1))
  weights = jax.random.uniform(jax.random.key(6), (tokens, width))

  def loss(fn):
    return lambda x, w, weights: jnp.sum(jnp.sin(fn(x, expert_ids, weights, w)))

  ref = jax.value_and_grad(loss(experts_lib.reference_moe), argnums=(0, 1, 2))(x, w, weights)
  out = jax.value_and_grad(loss(experts_lib.BACKENDS[backend]), argnums=(0, 1, 2))(x, w, weights)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-5)


@pytest.mark.parametrize("tokens", [100, 300])
@pytest.mark.parametrize("width", [1, 3, E])
def test_grouped_gradients_under_jit_with_capacity_and_overflow(tokens, width):
  x = jax.random.normal(jax.random.key(7), (tokens, H))
  w = _weights(3)
  logits = jax.random.normal(jax.random.key(8), (tokens, E)) * 3  # uneven groups: overflow blocks in use
  r = routing.route(routing.router_probs(logits), k=width, width=width, norm_topk_prob=False)
  layout = experts_lib.grouped_layout(tokens, width, E)
  plan = experts_lib._grouped_plan(r.experts, E, layout)
  assert layout.capacity > 0 and 0 < int(plan.used_blocks) <= layout.num_blocks

  def loss(fn):
    return lambda x, w, weights: jnp.sum(jnp.cos(fn(x, r.experts, weights, w)) * x[:, :1])

  ref = jax.grad(loss(experts_lib.reference_moe), argnums=(0, 1, 2))(x, w, r.weights)
  out = jax.jit(jax.grad(loss(experts_lib.grouped_moe), argnums=(0, 1, 2)))(x, w, r.weights)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)


def test_grouped_decoding_touches_only_the_routed_experts():
  """One token at k: no capacity slots, one overflow block per routed expert."""
  for width in (1, 2, 8):
    layout = experts_lib.grouped_layout(1, width, 64)
    experts = jnp.arange(width, dtype=jnp.int32)[None] * 3
    plan = experts_lib._grouped_plan(experts, 64, layout)
    assert layout.capacity == 0 and int(plan.used_blocks) == width


def test_grouped_layout_rows_scale_with_width():
  tokens, num_experts = 4096, 64
  for width in (1, 2, 4, 8):
    c, block, num_blocks = experts_lib.grouped_layout(tokens, width, num_experts)
    assert c % 8 == 0 and num_experts * c <= tokens * width  # capacity slots never exceed the assignments
    # the overflow allocation covers the worst case: `width` experts holding every token
    assert num_blocks * block >= width * (tokens - c) + block


def test_auto_backend_is_per_platform():
  assert experts_lib.default_backend("cpu") == "grouped"
  assert experts_lib.default_backend("gpu") == "grouped"
  assert experts_lib.default_backend("tpu") == "ragged"
  x = jax.random.normal(jax.random.key(2), (T, H))
  w, r = _weights(), _routing(3)
  np.testing.assert_allclose(experts_lib.moe_ffn(x, r.experts, r.weights, w, "auto"),
                             experts_lib.reference_moe(x, r.experts, r.weights, w), atol=1e-5)


def test_sorted_rows_scale_with_width():
  """The sorted backend computes T*W rows plus at most one padding block per expert, never T*E."""
  tokens, num_experts = 4096, 64
  rows = {}
  for width in (1, 2, 4, 8):
    block, num_blocks = experts_lib.sorted_layout(tokens * width, num_experts)
    rows[width] = block * num_blocks
    assert tokens * width <= rows[width] <= tokens * width + num_experts * block + block
  assert rows[1] < 0.25 * rows[8] and rows[8] < 0.25 * tokens * num_experts
  # decoding one token at k = 2 computes (and reads the weights of) at most 3 blocks
  assert experts_lib.sorted_layout(2, num_experts)[1] == 3


def test_block_size_is_a_bounded_power_of_two():
  for n, e in [(1, 64), (64 * 8, 64), (4096 * 8, 64), (10**7, 8)]:
    b = experts_lib.block_size_for(n, e)
    assert 8 <= b <= 128 and b & (b - 1) == 0
