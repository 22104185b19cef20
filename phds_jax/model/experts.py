"""Expert computation backends: pure functions of (tokens, routing, stacked expert weights).

All backends compute the same function, out[t] = sum_w weights[t, w] * expert_{experts[t, w]}(x[t]),
with expert(x) = down(silu(gate(x)) * up(x)):
  - "reference": a loop over every expert on every token (cost proportional to E), kept for tests;
  - "sorted": tokens sorted by expert into fixed-size blocks, one matmul per block (cost proportional to
    the routed width W, plus at most one padding block per expert); works on every platform;
  - "ragged": tokens sorted by expert and `jax.lax.ragged_dot` grouped matmuls (fast where the platform
    lowers ragged_dot natively, e.g. recent GPUs/TPUs; a dense fallback elsewhere).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class ExpertWeights(NamedTuple):
  """Stacked weights of E experts. gate, up: [E, H, I]; down: [E, I, H]."""

  gate: jax.Array
  up: jax.Array
  down: jax.Array


def _swiglu(x, gate, up, down):
  """x [..., H] with one expert's gate/up [H, I], down [I, H] -> [..., H]."""
  return (jax.nn.silu(x @ gate) * (x @ up)) @ down


def reference_moe(x: jax.Array, experts: jax.Array, weights: jax.Array, w: ExpertWeights) -> jax.Array:
  """x [T, H], experts/weights [T, W] -> [T, H], looping over all E experts (the test oracle)."""
  num_experts = w.gate.shape[0]
  combine = jnp.einsum("twe,tw->te", jax.nn.one_hot(experts, num_experts, dtype=weights.dtype), weights)
  combine = combine.astype(x.dtype)  # [T, E]

  def body(out, expert):
    gate, up, down, c = expert
    return out + c[:, None] * _swiglu(x, gate, up, down), None

  out, _ = jax.lax.scan(body, jnp.zeros_like(x), (w.gate, w.up, w.down, combine.T))
  return out


class _Sorted(NamedTuple):
  """Assignments (token, rank) sorted by expert id. All arrays have length T * W."""

  order: jax.Array  # flat assignment index (t * W + w) at each sorted position
  expert: jax.Array  # expert id at each sorted position
  group_sizes: jax.Array  # [E] assignments per expert


def _sort_by_expert(experts: jax.Array, num_experts: int) -> _Sorted:
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  return _Sorted(order=order, expert=flat[order], group_sizes=group_sizes)


def _combine(y_sorted: jax.Array, s: _Sorted, weights: jax.Array) -> jax.Array:
  """y_sorted [T*W, H] in sorted order -> weighted sum over ranks [T, H]."""
  num_tokens, width = weights.shape
  y = jnp.zeros_like(y_sorted).at[s.order].set(y_sorted).reshape(num_tokens, width, -1)
  return jnp.einsum("twh,tw->th", y, weights.astype(y.dtype))


def block_size_for(num_assignments: int, num_experts: int) -> int:
  """Rows per block: about the mean group size, a power of two in [8, 128]."""
  mean = max(1, num_assignments // num_experts)
  size = 1 << (mean.bit_length() - 1)
  return int(min(128, max(8, size)))


def sorted_layout(num_assignments: int, num_experts: int) -> tuple[int, int]:
  """(block size, static block count) of the sorted backend: enough blocks for any routing.

  Each non-empty expert group of g rows takes ceil(g / B) <= g / B + 1 blocks, and at most
  min(E, T*W) groups are non-empty, so decoding a few tokens touches only a few experts' weights.
  """
  block = block_size_for(num_assignments, num_experts)
  return block, num_assignments // block + min(num_experts, num_assignments) + 1


def sorted_moe(x: jax.Array, experts: jax.Array, weights: jax.Array, w: ExpertWeights) -> jax.Array:
  """x [T, H], experts/weights [T, W] -> [T, H] with FLOPs proportional to T * W.

  Each expert's assignments are padded to a multiple of the block size; every block then belongs to
  one expert and is one [B, H] x [H, I] matmul. The block count is a static upper bound (see
  sorted_layout); unused rows compute on token 0 and are never read back. Rows move by gathers only
  (index arrays are built with small int scatters), which XLA runs faster than row scatters.
  """
  num_tokens, width = experts.shape
  num_experts, hidden, _ = w.gate.shape
  n = num_tokens * width
  block, num_blocks = sorted_layout(n, num_experts)
  s = _sort_by_expert(experts, num_experts)

  padded_end = jnp.cumsum(-(-s.group_sizes // block) * block)  # [E]
  padded_start = padded_end - (-(-s.group_sizes // block) * block)
  group_start = jnp.cumsum(s.group_sizes) - s.group_sizes  # [E]
  rank_in_group = jnp.arange(n, dtype=jnp.int32) - group_start[s.expert]
  dest = (padded_start[s.expert] + rank_in_group).astype(jnp.int32)  # [T*W] row in the padded layout
  rows = num_blocks * block
  row_token = jnp.zeros((rows,), jnp.int32).at[dest].set((s.order // width).astype(jnp.int32))
  xs = x[row_token].reshape(num_blocks, block, hidden)
  block_first_row = jnp.arange(num_blocks, dtype=jnp.int32) * block
  block_expert = jnp.searchsorted(padded_end, block_first_row, side="right")
  block_expert = jnp.minimum(block_expert, num_experts - 1).astype(jnp.int32)  # [num_blocks]

  def one_block(args):
    xb, e = args
    return _swiglu(xb, w.gate[e], w.up[e], w.down[e])

  ys = jax.lax.map(one_block, (xs, block_expert)).reshape(rows, hidden)
  assignment_row = jnp.zeros((n,), jnp.int32).at[s.order].set(dest)  # in (token, rank) order
  y = ys[assignment_row].reshape(num_tokens, width, hidden)
  return jnp.einsum("twh,tw->th", y, weights.astype(y.dtype))


def ragged_moe(x: jax.Array, experts: jax.Array, weights: jax.Array, w: ExpertWeights) -> jax.Array:
  """x [T, H], experts/weights [T, W] -> [T, H] with `jax.lax.ragged_dot` grouped matmuls."""
  width = experts.shape[1]
  s = _sort_by_expert(experts, w.gate.shape[0])
  xs = x[s.order // width]  # [T*W, H]
  h = jax.nn.silu(jax.lax.ragged_dot(xs, w.gate, s.group_sizes))
  h = h * jax.lax.ragged_dot(xs, w.up, s.group_sizes)
  return _combine(jax.lax.ragged_dot(h, w.down, s.group_sizes), s, weights)


BACKENDS = {"reference": reference_moe, "sorted": sorted_moe, "ragged": ragged_moe}


def moe_ffn(x: jax.Array, experts: jax.Array, weights: jax.Array, w: ExpertWeights,
            backend: str) -> jax.Array:
  """Dispatches to the named backend. x [T, H], experts/weights [T, W] -> [T, H]."""
  return BACKENDS[backend](x, experts, weights, w)
