"""Expert computation backends: pure functions of (tokens, routing, stacked expert weights).

All backends compute the same function, out[t] = sum_w weights[t, w] * expert_{experts[t, w]}(x[t]),
with expert(x) = down(silu(gate(x)) * up(x)):
  - "reference": a loop over every expert on every token (cost proportional to E), kept for tests;
  - "sorted": tokens sorted by expert into fixed-size blocks, one matmul per block (cost proportional to
    the routed width W, plus at most one padding block per expert); works on every platform;
  - "ragged": tokens sorted by expert and `jax.lax.ragged_dot` grouped matmuls (fast where the platform
    lowers ragged_dot natively, e.g. TPUs; a dense fallback elsewhere, about 100x slower on CPU);
  - "chunked": tokens sorted by expert, each expert's group covered by a few chunks of one expert
    (power-of-two row counts, 8 to 256), looped over only the chunks in use: cost proportional to W
    however uneven the groups, and decoding reads only the routed experts' weights;
  - "auto": "ragged" on TPU, "chunked" elsewhere, unless $PHDS_JAX_EXPERT_BACKEND names one for the
    process (see `default_backend`).
"""

from __future__ import annotations

import functools
import os
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


_MAX_SORT_KEY = 2 ** 31 - 1


def _sort_by_expert(experts: jax.Array, num_experts: int) -> _Sorted:
  """Stable sort of the assignments by expert (an id of num_experts sorts last and is in no group). The key expert * n + index is unique, so one plain
  single-operand sort gives the stable order: about 5x faster on CPU than a stable two-operand argsort
  (8,192 assignments: 0.46 vs 2.4 ms)."""
  flat = experts.reshape(-1).astype(jnp.int32)
  n = flat.shape[0]
  group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  if (num_experts + 1) * n > _MAX_SORT_KEY:  # the key would overflow int32 (ids may be num_experts: none)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    return _Sorted(order=order, expert=flat[order], group_sizes=group_sizes)
  keys = jax.lax.sort(flat * n + jnp.arange(n, dtype=jnp.int32))
  return _Sorted(order=keys % n, expert=keys // n, group_sizes=group_sizes)


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


def chunk_sizes(num_assignments: int) -> tuple[int, ...]:
  """Row counts of the chunked backend's loops, largest first: where a group can exceed the largest
  chunk L (over 256 assignments), one loop of full L-row chunks; then one loop per size L, L/2, ..., 8
  for the rest of each group. L is the assignments rounded up to a power of two, in [8, 256]; each loop
  costs compile time, so small inputs (decoding, tests) get few."""
  largest = int(min(256, max(8, 1 << (num_assignments - 1).bit_length())))
  descending = tuple(largest >> i for i in range(largest.bit_length() - 3))
  return ((largest,) if num_assignments > largest else ()) + descending


class _Chunks(NamedTuple):
  """One loop's chunks (static length, the first `count` in use)."""

  start: jax.Array  # [n] first sorted row of each chunk
  end: jax.Array  # [n] end of that expert's group: rows from here on belong to the next experts
  expert: jax.Array  # [n]
  count: jax.Array  # [] chunks in use


def _chunk_plan(group_sizes: jax.Array, sizes: tuple[int, ...], num_assignments: int) -> tuple[_Chunks, ...]:
  """group_sizes [E] of the sorted rows -> one _Chunks per loop of `chunk_sizes`.

  Each group of g rows gets g // L full chunks of the largest size L (a loop of its own when
  num_assignments > L; otherwise no group exceeds L and a full group is the rest loop's L-row chunk); its
  rest, rounded up to 8 rows, gets at most one chunk per size, largest first. A size over 32 rows is
  taken when the rest fills over 3/4 of it; one of 32 rows or fewer when the rest fills over half of it,
  since such chunks cost about the same whatever their size (reading the expert's weights dominates): a
  rest of 17-32 rows runs as one 32-row chunk, not 16 + 8 (MoE layer 10-15% faster at k = 1 on CPU). So
  a group wastes under a quarter of its last large chunk plus 15 rows, and runs at most log2(L / 8)
  chunks beyond its full ones.
  """
  num_experts = group_sizes.shape[0]
  largest = sizes[0]
  experts = jnp.arange(num_experts, dtype=jnp.int32)
  group_end = jnp.cumsum(group_sizes).astype(jnp.int32)
  group_start = group_end - group_sizes
  plans, row, rest, rest_sizes = [], group_start, group_sizes, sizes
  if num_assignments > largest:
    full = group_sizes // largest
    full_end = jnp.cumsum(full)
    chunk = jnp.arange(num_assignments // largest, dtype=jnp.int32)
    full_expert = jnp.minimum(jnp.searchsorted(full_end, chunk, side="right"), num_experts - 1).astype(jnp.int32)
    full_start = group_start[full_expert] + (chunk - (full_end - full)[full_expert]) * largest
    plans.append(_Chunks(full_start, group_end[full_expert], full_expert, full_end[-1].astype(jnp.int32)))
    row, rest, rest_sizes = group_start + full * largest, group_sizes - full * largest, sizes[1:]
  rest = -(-rest // 8) * 8  # rows after the full chunks, rounded up to 8
  for size in rest_sizes:
    take = (rest > size // 2) if size <= 32 else (rest >= size) | (rest > 3 * size // 4)
    slot = jnp.where(take, jnp.cumsum(take) - 1, num_experts)  # chunks in use first; the others dropped
    start = jnp.zeros((num_experts,), jnp.int32).at[slot].set(row, mode="drop")
    expert = jnp.zeros((num_experts,), jnp.int32).at[slot].set(experts, mode="drop")
    plans.append(_Chunks(start, group_end[expert], expert, take.sum().astype(jnp.int32)))
    row = jnp.where(take, row + size, row)
    rest = jnp.where(take, jnp.maximum(rest - size, 0), rest)
  return tuple(plans)


def _chunk_loop(body, plan: _Chunks, size: int, carry):
  """carry -> body(start, keep, expert, carry) over the chunks in use; keep [size, 1] marks the chunk's
  rows inside its expert's group."""
  def step(j, carry):
    start, e = plan.start[j], plan.expert[j]
    keep = (start + jnp.arange(size) < plan.end[j])[:, None]
    return body(start, keep, e, carry)
  return jax.lax.fori_loop(0, plan.count, step, carry)


def _write_rows(dest: jax.Array, rows: jax.Array, start, keep: jax.Array) -> jax.Array:
  """dest with rows [start, start + len(rows)) replaced by `rows` where `keep`."""
  old = jax.lax.dynamic_slice_in_dim(dest, start, rows.shape[0])
  return jax.lax.dynamic_update_slice_in_dim(dest, jnp.where(keep, rows, old), start, 0)


def _chunks_forward(xs, plans, sizes, w: ExpertWeights):
  def run(size):
    def body(start, keep, e, y):
      xb = jax.lax.dynamic_slice_in_dim(xs, start, size)
      return _write_rows(y, _swiglu(xb, w.gate[e], w.up[e], w.down[e]), start, keep)
    return body

  y = jnp.zeros_like(xs)
  for plan, size in zip(plans, sizes):
    y = _chunk_loop(run(size), plan, size, y)
  return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _expert_chunks(xs, plans, sizes, w):
  """xs [n + L, H] sorted by expert (L = largest chunk, padding rows) -> expert outputs [n + L, H].

  Loops have data-dependent trip counts, hence the explicit gradient, which recomputes the
  activations chunk by chunk and masks the rows beyond each group.
  """
  return _chunks_forward(xs, plans, sizes, w)


def _expert_chunks_fwd(xs, plans, sizes, w):
  return _chunks_forward(xs, plans, sizes, w), (xs, plans, w)


def _expert_chunks_bwd(sizes, res, dy):
  xs, plans, w = res

  def run(size):
    def body(start, keep, e, grads):
      dx, dgate, dup, ddown = grads
      xb = jax.lax.dynamic_slice_in_dim(xs, start, size)
      dyb = jnp.where(keep, jax.lax.dynamic_slice_in_dim(dy, start, size), 0)
      gate, up, down = w.gate[e], w.up[e], w.down[e]
      a, b = xb @ gate, xb @ up
      sig = jax.nn.sigmoid(a)
      act = a * sig
      dh = dyb @ down.T
      da = dh * b * sig * (1 + a * (1 - sig))  # d silu(a) = sig * (1 + a * (1 - sig))
      db = dh * act
      dx = _write_rows(dx, da @ gate.T + db @ up.T, start, keep)
      return dx, dgate.at[e].add(xb.T @ da), dup.at[e].add(xb.T @ db), ddown.at[e].add((act * b).T @ dyb)
    return body

  grads = (jnp.zeros_like(xs), jnp.zeros_like(w.gate), jnp.zeros_like(w.up), jnp.zeros_like(w.down))
  for plan, size in zip(plans, sizes):
    grads = _chunk_loop(run(size), plan, size, grads)
  dx, dgate, dup, ddown = grads
  return dx, jax.tree.map(lambda _: None, plans), ExpertWeights(dgate, dup, ddown)


_expert_chunks.defvjp(_expert_chunks_fwd, _expert_chunks_bwd)


def chunked_moe(x: jax.Array, experts: jax.Array, weights: jax.Array, w: ExpertWeights) -> jax.Array:
  """x [T, H], experts/weights [T, W] -> [T, H]: rows sorted by expert, each group run as chunks of one
  expert (see `_chunk_plan`); work and weight reads scale with T * W, whatever the group sizes."""
  num_tokens, width = experts.shape
  num_experts, hidden, _ = w.gate.shape
  n = num_tokens * width
  sizes = chunk_sizes(n)
  pad = sizes[0]  # chunks may read up to L rows past the last group
  s = _sort_by_expert(experts, num_experts)
  order = s.order.astype(jnp.int32)  # assignment at each sorted row
  position = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))  # sorted row of each
  row_token = jnp.concatenate([order // width, jnp.full((pad,), num_tokens, jnp.int32)])
  xs = _take_rows(x, row_token, position.reshape(num_tokens, width))
  ys = _expert_chunks(xs, _chunk_plan(s.group_sizes, sizes, n), sizes, w)
  y = _take_rows(ys, position, jnp.concatenate([order, jnp.full((pad,), n, jnp.int32)])[:, None])
  return jnp.einsum("twh,tw->th", y.reshape(num_tokens, width, hidden), weights.astype(y.dtype))


BACKENDS = {"reference": reference_moe, "sorted": sorted_moe, "ragged": ragged_moe, "chunked": chunked_moe}


OVERRIDE_ENV = "PHDS_JAX_EXPERT_BACKEND"


def default_backend(platform: str) -> str:
  """The expert backend "auto" resolves to: $PHDS_JAX_EXPERT_BACKEND where set (one choice for every
  program of the process, e.g. a backend that compiles fast for many short test runs); otherwise by
  platform: TPUs lower ragged_dot to grouped-matmul kernels; CPUs and GPUs run it as dense matmuls over
  every expert, so they get the chunked backend."""
  override = os.environ.get(OVERRIDE_ENV, "")
  if override:
    if override not in BACKENDS:
      raise ValueError(f"${OVERRIDE_ENV}={override!r}; choose one of {tuple(BACKENDS)} or leave it unset")
    return override
  return "ragged" if platform == "tpu" else "chunked"


def moe_ffn(x: jax.Array, experts: jax.Array, weights: jax.Array, w: ExpertWeights,
            backend: str) -> jax.Array:
  """Dispatches to the named backend ("auto": `default_backend`). x [T, H], experts/weights [T, W] -> [T, H]."""
  if backend == "auto":
    backend = default_backend(jax.default_backend())
  return BACKENDS[backend](x, experts, weights, w)
