"""Device mesh, logical-axis rules, and the helpers that apply them.

Activations and parameters name logical axes ("batch", "embed", "exp", ...; parameters in
model/layout.py); rules map each to mesh axes. The mesh has a per-slice part ("data", "fsdp", "expert",
"tensor": devices joined by ICI) and a "slice" axis across slices (DCN; size 1 on one slice) used for data
parallelism only. `DEFAULT_RULES` (model/axes.py) is the project's table; a config's `axis_rules` replaces it for a run
(`with axis_rules(...)`). Rules are read when a function is traced. A dimension that its mesh axes do not
divide evenly stays replicated, so any mesh shape is valid for any model; a logical axis the rules do not
name is an error, never silently replicated.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from phds_jax.model.axes import DEFAULT_RULES, ICI_AXES, MESH_AXES, SLICE_AXIS  # noqa: F401  (re-exported)

_RULES: contextvars.ContextVar[Mapping[str, tuple[str, ...]]] = contextvars.ContextVar("phds_axis_rules",
                                                                                      default=DEFAULT_RULES)


def parse_rules(rules: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
  """{logical: "data,fsdp" | ("data", "fsdp") | ""} -> {logical: tuple of mesh axes}; ValueError naming a
  mesh axis that does not exist, one used twice, or a logical axis of DEFAULT_RULES left out."""
  out = {}
  for name, value in rules.items():
    axes = tuple(a.strip() for a in value.split(",") if a.strip()) if isinstance(value, str) else tuple(value)
    unknown = [a for a in axes if a not in MESH_AXES]
    if unknown:
      raise ValueError(f"axis_rules.{name}={value!r}: no mesh axis {unknown[0]!r}; the axes are {MESH_AXES}")
    if len(set(axes)) != len(axes):
      raise ValueError(f"axis_rules.{name}={value!r} names a mesh axis twice")
    out[name] = axes
  missing = sorted(set(DEFAULT_RULES) - set(out))
  if missing:
    raise ValueError(f"axis_rules has no rule for logical axes {missing} (an empty value replicates them)")
  return out


@contextlib.contextmanager
def axis_rules(rules: Mapping[str, Any]) -> Iterator[None]:
  """Uses `rules` (see parse_rules) for the shardings made and the functions traced inside the block."""
  token = _RULES.set(parse_rules(rules))
  try:
    yield
  finally:
    _RULES.reset(token)


# How tokens reach experts on other devices (model/expert_parallel.py): "all_to_all" sends each token only to
# the devices holding its experts; "all_gather" gathers the expert group's tokens on every member.
EXPERT_DISPATCHES = ("all_to_all", "all_gather")
# (dispatch, the mesh's device platform or None outside `use_mesh`), read when a function is traced
_DISPATCH: contextvars.ContextVar[tuple[str, Optional[str]]] = contextvars.ContextVar(
    "phds_expert_dispatch", default=("all_to_all", None))


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Mapping[str, Any], expert_dispatch: str = "all_to_all") -> Iterator[None]:
  """`mesh` (jax.set_mesh), `rules` (axis_rules) and the expert dispatch (EXPERT_DISPATCHES) for everything
  sharded or traced inside the block."""
  if expert_dispatch not in EXPERT_DISPATCHES:
    raise ValueError(f"expert_dispatch={expert_dispatch!r}; choose one of {EXPERT_DISPATCHES}")
  token = _DISPATCH.set((expert_dispatch, mesh.devices.flat[0].platform))
  try:
    with jax.set_mesh(mesh), axis_rules(rules):
      yield
  finally:
    _DISPATCH.reset(token)


def current_expert_dispatch() -> tuple[str, str]:
  """(the expert dispatch, the platform of the mesh's devices) in force here (`use_mesh`; outside one:
  "all_to_all" on JAX's default backend)."""
  dispatch, platform = _DISPATCH.get()
  return dispatch, platform or jax.default_backend()


def mesh_sizes(shape: dict[str, int], num_devices: int) -> dict[str, int]:
  """ICI_AXES sizes from `shape` (one size may be -1: the rest) for one slice of `num_devices`, or ValueError."""
  unknown = set(shape) - set(ICI_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; the axes are {ICI_AXES} (the slice axis is set "
                     "by the devices)")
  sizes = [int(shape.get(axis, 1)) for axis in ICI_AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh sizes {dict(zip(ICI_AXES, sizes))}: positive, with at most one -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"{num_devices} devices cannot fill mesh {dict(zip(ICI_AXES, sizes))}")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"mesh {dict(zip(ICI_AXES, sizes))} needs {int(np.prod(sizes))} devices per slice, "
                     f"have {num_devices}")
  return dict(zip(ICI_AXES, sizes))


def num_slices(devices: Sequence[jax.Device]) -> int:
  """Distinct `slice_index` values among `devices` (1 where devices carry none, e.g. CPU or one slice)."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(shape: dict[str, int], devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Mesh over `devices` (default all): `shape` gives ICI_AXES sizes per slice (one may be -1: the rest),
  the slice axis spans the slices. Device order follows the physical topology (jax's mesh_utils)."""
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top

  devices = list(jax.devices() if devices is None else devices)
  slices = num_slices(devices)
  if len(devices) % slices:
    raise ValueError(f"{len(devices)} devices do not split evenly over {slices} slices")
  ici = [1] + [mesh_sizes(shape, len(devices) // slices)[a] for a in ICI_AXES]
  if slices > 1:
    grid = mesh_utils.create_hybrid_device_mesh(ici, [slices] + [1] * len(ICI_AXES), devices)
  elif devices[0].platform in ("tpu", "gpu", "cuda", "rocm"):
    grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
  else:
    grid = np.asarray(devices).reshape(ici)
  return Mesh(grid, MESH_AXES)


def current_rules() -> Mapping[str, tuple[str, ...]]:
  """The logical -> mesh axis rules in force here (DEFAULT_RULES unless `axis_rules` set others)."""
  return _RULES.get()


def logical_to_spec(mesh_shape: dict[str, int], axes: Sequence[Optional[str]],
                    dims: Optional[Sequence[int]] = None,
                    rules: Optional[Mapping[str, tuple[str, ...]]] = None) -> P:
  """PartitionSpec for logical `axes` under `rules` (default: the current ones); a dim not divisible by
  its mesh axes, or reusing one, replicates."""
  rules = _RULES.get() if rules is None else rules
  used: set[str] = set()
  spec = []
  for i, name in enumerate(axes):
    if name is not None and name not in rules:
      raise ValueError(f"logical axis {name!r} has no sharding rule; the rules name {sorted(rules)}")
    mesh_axes = tuple(a for a in rules[name] if a not in used and mesh_shape.get(a, 1) > 1) if name else ()
    size = int(np.prod([mesh_shape[a] for a in mesh_axes])) if mesh_axes else 1
    if not mesh_axes or (dims is not None and dims[i] % size):
      spec.append(None)
      continue
    used.update(mesh_axes)
    spec.append(mesh_axes if len(mesh_axes) > 1 else mesh_axes[0])
  return P(*spec)


def path_keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)


def param_shardings(mesh: Mesh, tree: Any, axes_by_path: dict[tuple[str, ...], tuple[Optional[str], ...]]) -> Any:
  """NamedSharding per leaf of `tree` (arrays or ShapeDtypeStructs): params, or optimizer state holding them.

  A leaf whose key path ends with a parameter path of `axes_by_path` (model.layout.axes_by_path) is
  sharded by that parameter's logical axes; scalars (step counts) are replicated; any other leaf is an error.
  """
  shape = dict(mesh.shape)
  longest = max(len(p) for p in axes_by_path)

  def one(path, leaf):
    keys = path_keys(path)
    for n in range(min(longest, len(keys)), 0, -1):
      axes = axes_by_path.get(keys[-n:])
      if axes is not None and len(axes) == leaf.ndim:
        return NamedSharding(mesh, logical_to_spec(shape, axes, leaf.shape))
    if leaf.ndim == 0:
      return NamedSharding(mesh, P())
    raise ValueError(f"{'/'.join(keys)} {tuple(leaf.shape)} is no parameter of the model layout; "
                     "it has no logical axes to shard it by")

  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, ndim: int, batch_dim: int = 0,
                   shape: Optional[Sequence[int]] = None) -> NamedSharding:
  """Sharding of a data array whose `batch_dim` is the batch (replicated when `shape`'s batch does not
  divide over the batch axes)."""
  axes = [None] * ndim
  axes[batch_dim] = "batch"
  return NamedSharding(mesh, logical_to_spec(dict(mesh.shape), axes, shape))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def constrain(x: jax.Array, axes: Sequence[Optional[str]]) -> jax.Array:
  """Annotates activation `x` with logical `axes` under the current mesh (`jax.set_mesh`); else a no-op."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(dict(mesh.shape), axes, x.shape))


def mesh_and_batch_problems(config, devices: Optional[int] = None, slices: Optional[int] = None,
                            processes: Optional[int] = None) -> list[str]:
  """A run config's axis rules, its mesh over `devices` in `slices` (default: this runtime's) and its batch
  split, one line per mistake (the config checks and the slice plans both ask)."""
  out = []
  try:
    parse_rules(dict(config.axis_rules))
  except ValueError as e:
    out.append(str(e))
  if devices is None:
    devices, slices, processes = jax.device_count(), num_slices(jax.devices()), jax.process_count()
  try:
    sizes = mesh_sizes(dict(config.mesh), devices // slices)
  except ValueError as e:
    return out + [f"mesh: {e}"]
  batch, accum = config.train.batch_size, config.train.grad_accum
  data_parallel = slices * sizes["data"] * sizes["fsdp"] * sizes["expert"]
  if accum < 1 or batch % accum:
    out.append(f"train.batch_size={batch} must be a multiple of train.grad_accum={accum}")
  elif (batch // accum) % np.lcm(data_parallel, processes):
    out.append(f"train.batch_size={batch} / grad_accum={accum} rows per micro-batch do not divide over the "
               f"{data_parallel} data-parallel devices (mesh slice x data x fsdp x expert) and {processes} "
               "process(es); pass a multiple")
  if config.eval.batch_size % np.lcm(data_parallel, processes):
    out.append(f"eval.batch_size={config.eval.batch_size} validation rows do not divide over the {data_parallel} "
               f"data-parallel devices and {processes} process(es) (each process reads its share of every "
               "validation batch); pass a multiple")
  return out
