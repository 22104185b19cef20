"""Expert computation backends: pure functions of (tokens, routing, stacked expert weights).

All backends compute the same function, out[t] = sum_w weights[t, w] * expert_{experts[t, w]}(x[t]),
with expert(x) = down(silu(gate(x)) * up(x)):
  - "reference": a loop over every expert on every token (cost proportional to E), kept for tests;
  - "sorted": tokens sorted by expert into fixed-size blocks, one matmul per block (cost proportional to
    the routed width W, plus at most one padding block per expert); works on every platform;
  - "ragged": tokens sorted by expert and `jax.lax.ragged_dot` grouped matmuls (fast where the platform
    lowers ragged_dot natively, e.g. TPUs; a dense fallback elsewhere, about 100x slower on CPU);
  - "grouped": each expert's first C rows (C about the mean group size) as one batched matmul over
    experts, the rows beyond C in small blocks of one expert each, looped over only the blocks in use
    (cost proportional to W; decoding touches only the routed experts' weights);
  - "auto": "ragged" on TPU, "grouped" elsewhere (see `default_backend`).
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


class GroupedLayout(NamedTuple):
  """Static shape plan of the grouped backend."""

  capacity: int  # rows per expert in the batched matmul (a multiple of 8; 0 = none)
  block: int  # rows per overflow block
  num_blocks: int  # overflow blocks allocated: enough for any routing


def grouped_layout(num_tokens: int, width: int, num_experts: int) -> GroupedLayout:
  """Capacity = the mean group size rounded down to 8 (0 below 8, e.g. when decoding).

  An expert holds at most num_tokens rows (a token picks it once), so at most `width` experts can
  fill up and the rows beyond capacity number at most T*W - W*min(C, T); each overflowing expert
  wastes less than one block.
  """
  n = num_tokens * width
  mean = n // num_experts
  capacity = mean // 8 * 8
  block = 8 if mean < 64 else 16
  overflow = n - width * min(capacity, num_tokens)
  return GroupedLayout(capacity, block, overflow // block + min(num_experts, n) + 1)


class _GroupedPlan(NamedTuple):
  dense_token: jax.Array  # [E*C] token in each capacity slot (T = empty)
  block_token: jax.Array  # [num_blocks, block] token in each overflow row (T = empty)
  block_expert: jax.Array  # [num_blocks] expert of each overflow block
  used_blocks: jax.Array  # [] overflow blocks in use
  assignment_row: jax.Array  # [T, W] output row of each assignment: slot, or E*C + overflow row
  row_assignment: jax.Array  # [E*C + num_blocks*block] flat assignment of each row (T*W = empty)


def _grouped_plan(experts: jax.Array, num_experts: int, layout: GroupedLayout) -> _GroupedPlan:
  num_tokens, width = experts.shape
  n = num_tokens * width
  capacity, block, num_blocks = layout
  s = _sort_by_expert(experts, num_experts)
  group_start = jnp.cumsum(s.group_sizes) - s.group_sizes
  rank = jnp.arange(n, dtype=jnp.int32) - group_start[s.expert]
  overflow_blocks = -(-jnp.maximum(s.group_sizes - capacity, 0) // block)  # [E]
  block_end = jnp.cumsum(overflow_blocks)
  dense_rows = num_experts * capacity
  row = jnp.where(rank < capacity, s.expert * capacity + rank,
                  dense_rows + (block_end - overflow_blocks)[s.expert] * block + rank - capacity)
  rows = dense_rows + num_blocks * block
  order = s.order.astype(jnp.int32)
  row_assignment = jnp.full((rows,), n, jnp.int32).at[row].set(order)
  row_token = jnp.where(row_assignment < n, row_assignment // width, num_tokens)
  block_ids = jnp.arange(num_blocks, dtype=jnp.int32)
  block_expert = jnp.searchsorted(block_end, block_ids, side="right")
  return _GroupedPlan(
      dense_token=row_token[:dense_rows],
      block_token=row_token[dense_rows:].reshape(num_blocks, block),
      block_expert=jnp.minimum(block_expert, num_experts - 1).astype(jnp.int32),
      used_blocks=block_end[-1],
      assignment_row=jnp.zeros((n,), jnp.int32).at[order].set(row.astype(jnp.int32)).reshape(num_tokens, width),
      row_assignment=row_assignment)


def _with_zero_row(a: jax.Array) -> jax.Array:
  return jnp.concatenate([a, jnp.zeros_like(a[:1])])


@jax.custom_vjp
def _take_rows(src: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
  """src [S, H] -> src[index] [N, H], index == S meaning a zero row.

  inverse [S, m] lists the output rows holding each source row (N = none); the gradient is a gather
  and sum over it instead of XLA's slow row scatter-add.
  """
  del inverse
  return _with_zero_row(src)[index]


def _take_rows_fwd(src, index, inverse):
  return _take_rows(src, index, inverse), inverse


def _take_rows_bwd(inverse, g):
  return _with_zero_row(g)[inverse].sum(1), None, None


_take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def _overflow_forward(x, block_token, block_expert, used, w: ExpertWeights):
  x = _with_zero_row(x)
  num_blocks, block = block_token.shape

  def body(j, y):
    e = block_expert[j]
    yb = _swiglu(x[block_token[j]], w.gate[e], w.up[e], w.down[e])
    return jax.lax.dynamic_update_slice_in_dim(y, yb, j * block, 0)

  return jax.lax.fori_loop(0, used, body, jnp.zeros((num_blocks * block, x.shape[1]), x.dtype))


@jax.custom_vjp
def _overflow_blocks(x, block_token, block_expert, used, w: ExpertWeights):
  """x [T, H] -> [num_blocks * block, H]: block j is expert block_expert[j] on its tokens.

  Only the first `used` blocks run (a loop with a dynamic trip count, hence the explicit gradient,
  which recomputes the activations block by block). Empty rows (token T) read a zero row.
  """
  return _overflow_forward(x, block_token, block_expert, used, w)


def _overflow_fwd(x, block_token, block_expert, used, w):
  return _overflow_forward(x, block_token, block_expert, used, w), (x, block_token, block_expert, used, w)


def _overflow_bwd(res, dy):
  x, block_token, block_expert, used, w = res
  xz = _with_zero_row(x)
  block = block_token.shape[1]

  def body(j, grads):
    dx, dgate, dup, ddown = grads
    e, tokens = block_expert[j], block_token[j]
    xb, dyb = xz[tokens], jax.lax.dynamic_slice_in_dim(dy, j * block, block)
    gate, up, down = w.gate[e], w.up[e], w.down[e]
    a, b = xb @ gate, xb @ up
    sig = jax.nn.sigmoid(a)
    act = a * sig
    dh = dyb @ down.T
    da = dh * b * sig * (1 + a * (1 - sig))
    db = dh * act
    dx = dx.at[tokens].add(da @ gate.T + db @ up.T)
    return (dx, dgate.at[e].add(xb.T @ da), dup.at[e].add(xb.T @ db), ddown.at[e].add((act * b).T @ dyb))

  zeros = jax.tree.map(jnp.zeros_like, (xz, w.gate, w.up, w.down))
  dx, dgate, dup, ddown = jax.lax.fori_loop(0, used, body, zeros)
  return dx[:-1], None, None, None, ExpertWeights(dgate, dup, ddown)


_overflow_blocks.defvjp(_overflow_fwd, _overflow_bwd)


def grouped_moe(x: jax.Array, experts: jax.Array, weights: jax.Array, w: ExpertWeights) -> jax.Array:
  """x [T, H], experts/weights [T, W] -> [T, H]; see `grouped_layout` for the row plan."""
  num_tokens, width = experts.shape
  num_experts, hidden, _ = w.gate.shape
  layout = grouped_layout(num_tokens, width, num_experts)
  capacity = layout.capacity
  p = _grouped_plan(experts, num_experts, layout)
  outputs = []
  if capacity:
    dense_rows = num_experts * capacity
    slot_of_assignment = jnp.where(p.assignment_row < dense_rows, p.assignment_row, dense_rows)
    xd = _take_rows(x, p.dense_token, slot_of_assignment).reshape(num_experts, capacity, hidden)
    h = jax.nn.silu(jnp.einsum("ech,ehi->eci", xd, w.gate)) * jnp.einsum("ech,ehi->eci", xd, w.up)
    outputs.append(jnp.einsum("eci,eih->ech", h, w.down).reshape(dense_rows, hidden))
  outputs.append(_overflow_blocks(x, p.block_token, p.block_expert, p.used_blocks, w))
  y_rows = jnp.concatenate(outputs)
  y = _take_rows(y_rows, p.assignment_row.reshape(-1), p.row_assignment[:, None])
  return jnp.einsum("twh,tw->th", y.reshape(num_tokens, width, hidden), weights.astype(y.dtype))


BACKENDS = {"reference": reference_moe, "sorted": sorted_moe, "ragged": ragged_moe, "grouped": grouped_moe}


def default_backend(platform: str) -> str:
  """The expert backend "auto" resolves to: TPUs lower ragged_dot to grouped-matmul kernels; CPUs and
  GPUs run it as dense matmuls over every expert, so they get the grouped backend."""
  return "ragged" if platform == "tpu" else "grouped"


def moe_ffn(x: jax.Array, experts: jax.Array, weights: jax.Array, w: ExpertWeights,
            backend: str) -> jax.Array:
  """Dispatches to the named backend ("auto": `default_backend`). x [T, H], experts/weights [T, W] -> [T, H]."""
  if backend == "auto":
    backend = default_backend(jax.default_backend())
  return BACKENDS[backend](x, experts, weights, w)
