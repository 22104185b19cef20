"""Expert parallelism: routed experts computed where their weights live, under a mesh with "expert" > 1.

Without it, XLA's partitioner meets a data-dependent expert index and gathers every expert's weights on
every device. Here (shard_map over the current mesh) each device keeps its E / n experts:

  1. tokens [T, H] (sharded over the batch axes) and their routing are gathered across the expert group
     (the devices that share every batch coordinate but the expert one): n x T_local tokens;
  2. the device's expert weights are gathered over the axes that shard their hidden dimension (FSDP; only
     the local experts, never all of them);
  3. the local backend computes the assignments to local experts only (the others get an out-of-range
     expert id: the chunked and ragged backends never compute them; sorted computes them at weight 0);
  4. partial outputs are summed over the tensor axes (an intermediate dimension split there) and summed
     and scattered back over the expert group (reduce-scatter): each device gets its tokens' outputs.

Communication per MoE layer: tokens gathered and outputs reduce-scattered within the expert group, plus
the FSDP gather of the local experts; gradients flow back through the transposed collectives.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
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

  def local(x, experts, weights, gate, up, down):
    xs = jax.lax.all_gather(x, expert_axes, axis=0, tiled=True)  # [n * T_local, H]
    ids = jax.lax.all_gather(experts, expert_axes, axis=0, tiled=True)
    wts = jax.lax.all_gather(weights, expert_axes, axis=0, tiled=True)
    if hidden_axes_in:
      gate = jax.lax.all_gather(gate, hidden_axes_in, axis=1, tiled=True)
      up = jax.lax.all_gather(up, hidden_axes_in, axis=1, tiled=True)
    if hidden_axes_down:
      down = jax.lax.all_gather(down, hidden_axes_down, axis=2, tiled=True)
    num_local = gate.shape[0]
    first = jax.lax.axis_index(expert_axes) * num_local
    local_ids = ids - first
    mine = (local_ids >= 0) & (local_ids < num_local)
    # others: an id past the local experts (skipped by chunked / ragged / reference); sorted needs a real one
    other = 0 if backend == "sorted" else num_local
    y = experts_lib.moe_ffn(xs, jnp.where(mine, local_ids, other), jnp.where(mine, wts, 0),
                            experts_lib.ExpertWeights(gate, up, down), backend)
    if mlp_axes:
      y = jax.lax.psum(y, mlp_axes)
    return jax.lax.psum_scatter(y, expert_axes, scatter_dimension=0, tiled=True)

  return jax.shard_map(local, in_specs=(token_spec, token_spec, token_spec, gate_spec, gate_spec, down_spec),
                       out_specs=token_spec, check_vma=False)(x, experts, weights, w.gate, w.up, w.down)
