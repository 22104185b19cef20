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


FAST_BACKENDS = ["chunked", "sorted", "ragged"]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("width", [1, 2, 5, E])
def test_backend_equals_reference(backend, width):
  x = jax.random.normal(jax.random.key(2), (T, H))
  w, r = _weights(), _routing(width)
  ref = jax.jit(experts_lib.reference_moe)(x, r.experts, r.weights, w)
  out = jax.jit(experts_lib.moe_ffn, static_argnums=4)(x, r.experts, r.weights, w, backend)
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_backend_gradients_equal_reference(backend):
  x = jax.random.normal(jax.random.key(2), (T, H))
  w = _weights()
  r = _routing(4, k=jnp.array([1, 2, 3, 4] * 10)[:T])  # traced-style zero weights included

  def loss(fn):
    return lambda x, w, weights: jnp.sum(jnp.sin(fn(x, r.experts, weights, w)))

  ref = jax.jit(jax.grad(loss(experts_lib.reference_moe), argnums=(0, 1, 2)))(x, w, r.weights)
  out = jax.jit(jax.grad(loss(experts_lib.BACKENDS[backend]), argnums=(0, 1, 2)))(x, w, r.weights)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("tokens, width", [(1, 1), (1, 8), (3, 2), (2, 8)])
def test_backend_is_exact_for_decode_sized_inputs(backend, tokens, width):
  x = jax.random.normal(jax.random.key(4), (tokens, H))
  w = _weights()
  logits = jax.random.normal(jax.random.key(5), (tokens, E))
  r = routing.route(routing.router_probs(logits), k=width, width=width, norm_topk_prob=True)
  np.testing.assert_allclose(jax.jit(experts_lib.BACKENDS[backend])(x, r.experts, r.weights, w),
                             jax.jit(experts_lib.reference_moe)(x, r.experts, r.weights, w), atol=1e-5)


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

  ref = jax.jit(jax.value_and_grad(loss(experts_lib.reference_moe), argnums=(0, 1, 2)))(x, w, weights)
  out = jax.jit(jax.value_and_grad(loss(experts_lib.BACKENDS[backend]), argnums=(0, 1, 2)))(x, w, weights)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-5)


def _plan_rows(group_sizes, num_assignments):
  """(computed rows, kept rows per chunk as (start, stop, expert)) of the chunked backend's plan."""
  sizes = experts_lib.chunk_sizes(num_assignments)
  plans = experts_lib._chunk_plan(jnp.asarray(group_sizes, jnp.int32), sizes, num_assignments)
  computed, kept = 0, []
  for plan, size in zip(plans, sizes):
    for j in range(int(plan.count)):
      start, end, expert = int(plan.start[j]), int(plan.end[j]), int(plan.expert[j])
      computed += size
      kept.append((start, min(start + size, end), expert))
  return computed, kept


@pytest.mark.parametrize("seed", range(6))
def test_chunk_plan_covers_each_row_once_with_bounded_waste(seed):
  """Random group sizes (empty, tiny, huge): the kept rows of all chunks partition [0, n), each chunk
  lies inside its own expert's group, and at most a third of each group plus 16 rows is wasted."""
  rng = np.random.default_rng(seed)
  num_experts = int(rng.choice([1, 4, 16, 64]))
  group_sizes = rng.integers(0, [3, 40, 300, 2000][seed % 4], num_experts)
  group_sizes[rng.random(num_experts) < 0.3] = 0
  n = int(group_sizes.sum())
  if n == 0:
    group_sizes[0], n = 5, 5
  computed, kept = _plan_rows(group_sizes, n)
  starts = np.cumsum(group_sizes) - group_sizes
  covered = np.zeros(n, np.int32)
  for start, stop, expert in kept:
    assert starts[expert] <= start < stop <= starts[expert] + group_sizes[expert]
    covered[start:stop] += 1
  np.testing.assert_array_equal(covered, 1)
  assert computed <= n + n / 3 + 16 * num_experts


@pytest.mark.parametrize("shape, num_experts", [((1, 1), 4), ((7, 3), 5), ((1024, 8), 64), ((300, 2), 128)])
@pytest.mark.parametrize("max_key", [2 ** 31 - 1, 0])  # 0: the argsort taken where keys would overflow
def test_sort_by_expert_is_a_stable_sort(shape, num_experts, max_key, monkeypatch):
  """The combined-key sort gives the order of a stable argsort, the sorted ids and the group sizes."""
  monkeypatch.setattr(experts_lib, "_MAX_SORT_KEY", max_key)
  rng = np.random.default_rng(sum(shape))
  experts = rng.integers(0, num_experts, shape).astype(np.int32)
  experts[0, 0] = num_experts - 1  # the largest key
  s = experts_lib._sort_by_expert(jnp.asarray(experts), num_experts)  # eager: the patched bound applies
  flat = experts.reshape(-1)
  order = np.argsort(flat, kind="stable")
  np.testing.assert_array_equal(s.order, order)
  np.testing.assert_array_equal(s.expert, flat[order])
  np.testing.assert_array_equal(s.group_sizes, np.bincount(flat, minlength=num_experts))


def test_chunk_sizes_are_powers_of_two_up_to_256():
  """A loop of full 256-row chunks only where a group can exceed 256 rows, then the rest's sizes down to 8."""
  for n, largest, full_loop in [(1, 8, False), (9, 16, False), (200, 256, False), (256, 256, False),
                                (257, 256, True), (10**6, 256, True)]:
    sizes = experts_lib.chunk_sizes(n)
    rest = sizes[1:] if full_loop else sizes
    assert (sizes[:2] == (largest, largest)) == full_loop
    assert list(rest) == [largest >> i for i in range(len(rest))] and rest[-1] == 8


@pytest.mark.parametrize("tokens", [100, 300])
@pytest.mark.parametrize("width", [1, 3, E])
def test_chunked_gradients_under_jit_with_uneven_groups(tokens, width):
  x = jax.random.normal(jax.random.key(7), (tokens, H))
  w = _weights(3)
  logits = jax.random.normal(jax.random.key(8), (tokens, E)) * 3  # uneven groups: many chunk sizes in use
  r = routing.route(routing.router_probs(logits), k=width, width=width, norm_topk_prob=False)
  _, kept = _plan_rows(np.bincount(np.asarray(r.experts).ravel(), minlength=E), tokens * width)
  assert width == E or len({stop - start for start, stop, _ in kept}) > 2  # (at width E every group is T)

  def loss(fn):
    return lambda x, w, weights: jnp.sum(jnp.cos(fn(x, r.experts, weights, w)) * x[:, :1])

  ref = jax.grad(loss(experts_lib.reference_moe), argnums=(0, 1, 2))(x, w, r.weights)
  out = jax.jit(jax.grad(loss(experts_lib.chunked_moe), argnums=(0, 1, 2)))(x, w, r.weights)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)


def test_chunked_decoding_touches_only_the_routed_experts():
  """One token at k: one 8-row chunk per routed expert, so only their weights are read."""
  for width in (1, 2, 8):
    routed = np.arange(width) * 3
    computed, kept = _plan_rows(np.bincount(routed, minlength=64), width)
    assert computed == 8 * width and sorted(e for _, _, e in kept) == list(routed)


def test_chunked_rows_scale_with_width():
  """Balanced routing of 4096 tokens over 64 experts: the computed rows grow with W, never T*E."""
  tokens, num_experts = 4096, 64
  for width in (1, 2, 4, 8):
    n = tokens * width
    computed, _ = _plan_rows(np.full(num_experts, n // num_experts), n)
    assert n <= computed <= 1.1 * n


def test_auto_backend_is_per_platform_unless_the_process_names_one(monkeypatch):
  monkeypatch.delenv(experts_lib.OVERRIDE_ENV, raising=False)  # the suite sets it (conftest.py)
  assert experts_lib.default_backend("cpu") == "chunked"
  assert experts_lib.default_backend("gpu") == "chunked"
  assert experts_lib.default_backend("tpu") == "ragged"
  monkeypatch.setenv(experts_lib.OVERRIDE_ENV, "sorted")
  assert [experts_lib.default_backend(p) for p in ("cpu", "gpu", "tpu")] == ["sorted"] * 3
  monkeypatch.setenv(experts_lib.OVERRIDE_ENV, "fast")
  with pytest.raises(ValueError, match=r"\$PHDS_JAX_EXPERT_BACKEND='fast'; choose one of"):
    experts_lib.default_backend("cpu")
  monkeypatch.delenv(experts_lib.OVERRIDE_ENV)
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
