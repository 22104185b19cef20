"""Device mesh, the one logical-axis rules table, and the helpers that apply it.

Layers and parameters name logical axes ("batch", "embed", "exp", ...); `RULES` maps each to mesh axes
("data", "fsdp", "expert", "tensor"). A dimension that the mapped mesh axes do not divide evenly stays
replicated, so any mesh shape is valid for any model.
"""

from __future__ import annotations

import re
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

# parameter path (joined with "/") -> logical axes of its dimensions; first match wins.
PARAM_AXES: tuple[tuple[str, tuple[Optional[str], ...]], ...] = (
    (r"embed_tokens/embedding$", ("vocab", "embed")),
    (r"lm_head/kernel$", ("embed", "vocab")),
    (r"self_attn/[qkv]_proj/kernel$", ("embed", "heads")),
    (r"self_attn/[qkv]_proj/bias$", ("heads",)),
    (r"self_attn/o_proj/kernel$", ("heads", "embed")),
    (r"mlp/experts/(gate|up)_proj$", ("exp", "embed", "mlp")),
    (r"mlp/experts/down_proj$", ("exp", "mlp", "embed")),
    (r"mlp/gate/kernel$", ("embed", "router")),
    (r"shared_expert_gate/kernel$", ("embed", "router")),
    (r"(gate|up)_proj/kernel$", ("embed", "mlp")),
    (r"down_proj/kernel$", ("mlp", "embed")),
    (r"(scale|bias)$", ("norm",)),
)


def make_mesh(shape: dict[str, int], devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Mesh over `devices` (default all) with MESH_AXES sizes from `shape`; one size may be -1 (the rest)."""
  devices = list(jax.devices() if devices is None else devices)
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; the axes are {MESH_AXES}")
  sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: positive, with at most one -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices cannot fill mesh {dict(zip(MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"have {len(devices)}")
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


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


def param_axes(path: str, ndim: int) -> tuple[Optional[str], ...]:
  for pattern, axes in PARAM_AXES:
    if re.search(pattern, path) and len(axes) == ndim:
      return axes
  return (None,) * ndim


def _path_str(path) -> str:
  return "/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)


def param_shardings(mesh: Mesh, params: Any) -> Any:
  """NamedSharding per parameter (params may be arrays or ShapeDtypeStructs)."""
  shape = dict(mesh.shape)

  def one(path, leaf):
    return NamedSharding(mesh, logical_to_spec(shape, param_axes(_path_str(path), leaf.ndim), leaf.shape))

  return jax.tree_util.tree_map_with_path(one, params)


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
