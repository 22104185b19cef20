"""Device mesh, the one logical-axis rules table, and the helpers that apply it.

Activations and parameters name logical axes ("batch", "embed", "exp", ...; parameters in
model/layout.py); `RULES` maps each to mesh axes ("data", "fsdp", "expert", "tensor"). A dimension that the mapped mesh axes do not divide evenly stays
replicated, so any mesh shape is valid for any model.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical axis -> mesh axes (in order); the single table the whole project uses.
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp", "expert"),
    "length": (),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "mlp": ("tensor",),
    "exp": ("expert",),
    "norm": (),
    "router": (),
}

def mesh_sizes(shape: dict[str, int], num_devices: int) -> dict[str, int]:
  """MESH_AXES sizes from `shape` (one size may be -1: the rest) for `num_devices`, or ValueError."""
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; the axes are {MESH_AXES}")
  sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: positive, with at most one -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"{num_devices} devices cannot fill mesh {dict(zip(MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"have {num_devices}")
  return dict(zip(MESH_AXES, sizes))


def make_mesh(shape: dict[str, int], devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Mesh over `devices` (default all) with MESH_AXES sizes from `shape`; one size may be -1 (the rest)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_sizes(shape, len(devices))
  return Mesh(np.asarray(devices).reshape([sizes[a] for a in MESH_AXES]), MESH_AXES)


def logical_to_spec(mesh_shape: dict[str, int], axes: Sequence[Optional[str]],
                    dims: Optional[Sequence[int]] = None) -> P:
  """PartitionSpec for logical `axes`; a dim not divisible by its mesh axes, or reusing one, replicates."""
  used: set[str] = set()
  spec = []
  for i, name in enumerate(axes):
    mesh_axes = tuple(a for a in RULES.get(name, ()) if a not in used and mesh_shape.get(a, 1) > 1) if name else ()
    size = int(np.prod([mesh_shape[a] for a in mesh_axes])) if mesh_axes else 1
    if not mesh_axes or (dims is not None and dims[i] % size):
      spec.append(None)
      continue
    used.update(mesh_axes)
    spec.append(mesh_axes if len(mesh_axes) > 1 else mesh_axes[0])
  return P(*spec)


def _path_keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)


def param_shardings(mesh: Mesh, tree: Any, axes_by_path: dict[tuple[str, ...], tuple[Optional[str], ...]]) -> Any:
  """NamedSharding per leaf of `tree` (arrays or ShapeDtypeStructs): params, or optimizer state holding them.

  A leaf whose key path ends with a parameter path of `axes_by_path` (model.layout.axes_by_path) is
  sharded by that parameter's logical axes; scalars (step counts) are replicated; any other leaf is an error.
  """
  shape = dict(mesh.shape)
  longest = max(len(p) for p in axes_by_path)

  def one(path, leaf):
    keys = _path_keys(path)
    for n in range(min(longest, len(keys)), 0, -1):
      axes = axes_by_path.get(keys[-n:])
      if axes is not None and len(axes) == leaf.ndim:
        return NamedSharding(mesh, logical_to_spec(shape, axes, leaf.shape))
    if leaf.ndim == 0:
      return NamedSharding(mesh, P())
    raise ValueError(f"{'/'.join(keys)} {tuple(leaf.shape)} is no parameter of the model layout; "
                     "it has no logical axes to shard it by")

  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, ndim: int, batch_dim: int = 0) -> NamedSharding:
  """Sharding of a data array whose `batch_dim` is the batch."""
  axes = [None] * ndim
  axes[batch_dim] = "batch"
  return NamedSharding(mesh, logical_to_spec(dict(mesh.shape), axes))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def constrain(x: jax.Array, axes: Sequence[Optional[str]]) -> jax.Array:
  """Annotates activation `x` with logical `axes` under the current mesh (`jax.set_mesh`); else a no-op."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(dict(mesh.shape), axes, x.shape))
