"""Expert parallelism: routed experts computed where their weights live, under a mesh with "expert" > 1.

Without it, XLA's partitioner meets a data-dependent expert index and gathers every expert's weights on
every device. Here (shard_map over the current mesh) each of the n devices of an expert group (the devices
that share every batch coordinate but the expert one) keeps its E / n experts, gathers only those over the
axes that shard their hidden dimension (FSDP), and sums partial outputs over the tensor axes. Tokens reach
their experts by one of two dispatches (`sharding.use_mesh(..., expert_dispatch=)`):

  - "all_to_all" (default): each token goes only to the devices holding its experts, and each result comes
    back to the token's device, ~2 k (n - 1) / n x T x H per MoE layer for T local tokens. Assignments of
    weight 0 (ranks past a row's k under a hard mask) are not sent. On TPU one `ragged_all_to_all` each
    way (its receive buffer has room for the worst case, n x T x k rows); elsewhere (CPU: no lowering of
    ragged_all_to_all) an exact stand-in, a dense `all_to_all` of a [n, T x k, H] buffer padded for the
    worst case (n times the bytes; for tests and small runs).
  - "all_gather": the expert group's tokens gathered on every member (n x T rows) and the outputs summed
    and scattered back (reduce-scatter): ~2 (n - 1) x T x H per layer.

Each device computes only the assignments to its own experts (the others get an out-of-range expert id:
the chunked, ragged and reference backends never compute them; sorted computes them at weight 0).
Gradients flow back through the transposed collectives.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from phds_jax.model import sharding as sharding_lib
from phds_jax.model import experts as experts_lib


def _axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def plan(num_tokens: int, w: experts_lib.ExpertWeights) -> Optional[tuple[P, P, P, P]]:
  """(token spec, gate/up spec, down spec, expert axes) when the current mesh shards experts and the
  tokens split evenly over the batch axes, else None (the plain path)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  shape = dict(mesh.shape)
  gate_spec = sharding_lib.logical_to_spec(shape, ("exp", "embed", "mlp"), w.gate.shape)
  down_spec = sharding_lib.logical_to_spec(shape, ("exp", "mlp", "embed"), w.down.shape)
  expert_axes = _axes(gate_spec[0])
  token_spec = sharding_lib.logical_to_spec(shape, ("batch", None), (num_tokens, 1))
  batch_axes = _axes(token_spec[0])
  if not expert_axes or not set(expert_axes) <= set(batch_axes):
    return None
  return token_spec, gate_spec, down_spec, P(*expert_axes)


def moe_ffn(x: jax.Array, experts: jax.Array, weights: jax.Array, w: experts_lib.ExpertWeights,
            backend: str) -> jax.Array:
  """x [T, H], experts/weights [T, W] -> [T, H]; expert-parallel where the mesh allows (see `plan`)."""
  layout = plan(x.shape[0], w)
  if layout is None:
    return experts_lib.moe_ffn(x, experts, weights, w, backend)
  token_spec, gate_spec, down_spec, expert_spec = layout
  expert_axes = _axes(expert_spec[0])
  hidden_axes_in, mlp_axes = _axes(gate_spec[1]), _axes(gate_spec[2])
  hidden_axes_down = _axes(down_spec[2])
  mesh = jax.sharding.get_abstract_mesh()
  group = int(np.prod([dict(mesh.shape)[a] for a in expert_axes]))
  dispatch, platform = sharding_lib.current_expert_dispatch()
  ragged = platform == "tpu"  # ragged_all_to_all has no CPU lowering: the padded stand-in there

  def local(x, experts, weights, gate, up, down):
    if hidden_axes_in:
      gate = jax.lax.all_gather(gate, hidden_axes_in, axis=1, tiled=True)
      up = jax.lax.all_gather(up, hidden_axes_in, axis=1, tiled=True)
    if hidden_axes_down:
      down = jax.lax.all_gather(down, hidden_axes_down, axis=2, tiled=True)
    local_weights = experts_lib.ExpertWeights(gate, up, down)
    num_local = gate.shape[0]
    # others: an id past the local experts (skipped by chunked / ragged / reference); sorted needs a real one
    other = 0 if backend == "sorted" else num_local

    def compute(rows, ids, row_weights):
      """rows [R, H] with local expert ids [R, W'] (or >= num_local: not here) -> [R, H], summed over tensor."""
      mine = (ids >= 0) & (ids < num_local)
      y = experts_lib.moe_ffn(rows, jnp.where(mine, ids, other), jnp.where(mine, row_weights, 0), local_weights,
                              backend)
      return jax.lax.psum(y, mlp_axes) if mlp_axes else y

    if dispatch == "all_gather":
      xs = jax.lax.all_gather(x, expert_axes, axis=0, tiled=True)  # [n * T_local, H]
      ids = jax.lax.all_gather(experts, expert_axes, axis=0, tiled=True)
      wts = jax.lax.all_gather(weights, expert_axes, axis=0, tiled=True)
      y = compute(xs, ids - jax.lax.axis_index(expert_axes) * num_local, wts)
      return jax.lax.psum_scatter(y, expert_axes, scatter_dimension=0, tiled=True)
    exchange = _ragged_exchange if ragged else _padded_exchange
    tokens, width = experts.shape
    dest = jnp.where(weights != 0, experts // num_local, group).reshape(-1)  # [A]; group: not sent
    rows = jnp.repeat(x, width, axis=0)  # [A, H]: assignment a = token a // width
    y = exchange(rows, experts.reshape(-1) % num_local, dest, group, expert_axes,
                 lambda r, i: compute(r, i[:, None], jnp.ones(i.shape + (1,), r.dtype)))
    return jnp.sum(weights.reshape(tokens, width, 1).astype(y.dtype) * y.reshape(tokens, width, -1), axis=1)

  return jax.shard_map(local, in_specs=(token_spec, token_spec, token_spec, gate_spec, gate_spec, down_spec),
                       out_specs=token_spec, check_vma=False)(x, experts, weights, w.gate, w.up, w.down)


class SendPlan(NamedTuple):
  """Rows sorted by destination device: `order` [A] (row indices), their destinations `dest` [A]
  (group: not sent, last), per-destination `counts` [n] and each sorted row's `rank` among its destination's."""

  order: jax.Array
  dest: jax.Array
  counts: jax.Array
  starts: jax.Array
  rank: jax.Array


def send_plan(dest: jax.Array, group: int) -> SendPlan:
  """dest int32 [A] in [0, group] (group: not sent) -> SendPlan (stable: a destination's rows keep their order)."""
  order = jnp.argsort(dest, stable=True)
  sorted_dest = dest[order]
  counts = jnp.zeros((group + 1,), jnp.int32).at[dest].add(1)[:group]
  starts = jnp.cumsum(counts) - counts
  rank = jnp.arange(dest.shape[0]) - starts[jnp.minimum(sorted_dest, group - 1)]
  return SendPlan(order, sorted_dest, counts, starts, rank)


def pack(rows: jax.Array, plan_: SendPlan, group: int, fill=0) -> jax.Array:
  """rows [A, ...] -> [group * A, ...]: block j (A rows) holds the rows sent to device j in order, then `fill`
  (room for the worst case: every row to one device). Unsent rows are dropped."""
  size = rows.shape[0]
  buffer = jnp.full((group, size) + rows.shape[1:], fill, rows.dtype)
  buffer = buffer.at[plan_.dest, plan_.rank].set(rows[plan_.order], mode="drop")  # dest == group: dropped
  return buffer.reshape((group * size,) + rows.shape[1:])


def unpack(buffer: jax.Array, plan_: SendPlan, group: int) -> jax.Array:
  """The inverse of `pack` for results: [group * A, ...] -> [A, ...] in the rows' original order (0 for unsent)."""
  size = plan_.order.shape[0]
  blocks = buffer.reshape((group, size) + buffer.shape[1:])
  sent = plan_.dest < group
  values = blocks[jnp.minimum(plan_.dest, group - 1), plan_.rank]
  values = jnp.where(sent.reshape((-1,) + (1,) * (values.ndim - 1)), values, 0)
  return jnp.zeros_like(values).at[plan_.order].set(values)


def _padded_exchange(rows, ids, dest, group: int, axes, compute):
  """Each row to device dest (a dense all_to_all of worst-case padded blocks), `compute`d there against its
  local expert id, the result back in the rows' order: [A, H]."""
  plan_ = send_plan(dest, group)
  received = jax.lax.all_to_all(pack(rows, plan_, group), axes, 0, 0, tiled=True)  # block j: from device j
  received_ids = jax.lax.all_to_all(pack(ids, plan_, group, fill=-1), axes, 0, 0, tiled=True)
  results = jax.lax.all_to_all(compute(received, received_ids), axes, 0, 0, tiled=True)
  return unpack(results, plan_, group)


def _ragged_exchange(rows, ids, dest, group: int, axes, compute):
  """As `_padded_exchange`, with `ragged_all_to_all` (TPU): only the rows sent cross the interconnect; the
  receive buffer has room for the worst case (group x A rows)."""
  plan_ = send_plan(dest, group)
  size = rows.shape[0]
  sent_rows, sent_ids = rows[plan_.order], ids[plan_.order]
  counts = jax.lax.all_gather(plan_.counts, axes, tiled=False)  # [group, group]: sender s -> receiver r
  me = jax.lax.axis_index(axes)
  before = jnp.cumsum(counts, axis=0) - counts  # [s, r]: rows senders before s put in r's buffer
  recv_sizes = counts[:, me]
  recv_starts = jnp.cumsum(recv_sizes) - recv_sizes
  send = lambda operand, output: jax.lax.ragged_all_to_all(
      operand, output, plan_.starts, plan_.counts, before[me], recv_sizes, axis_name=axes)
  received = send(sent_rows, jnp.zeros((group * size,) + rows.shape[1:], rows.dtype))
  received_ids = send(sent_ids, jnp.full((group * size,), -1, ids.dtype))
  results = compute(received, received_ids)
  # back: the chunk from sender s (at recv_starts[s] here) returns to s's sorted rows at its starts[me]
  sender_starts = (jnp.cumsum(counts, axis=1) - counts)[:, me]
  back = jax.lax.ragged_all_to_all(results, jnp.zeros_like(sent_rows), recv_starts, recv_sizes, sender_starts,
                                   plan_.counts, axis_name=axes)
  return jnp.zeros_like(back).at[plan_.order].set(back)  # rows never sent: zeros (the buffer's tail)
