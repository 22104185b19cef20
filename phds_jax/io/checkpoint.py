"""Orbax model checkpoints: a directory with `model_config.json` and the params pytree under `params/`.

This is the exchange format of `convert` (HF <-> orbax). Training state (optimizer, step, data iterator)
is managed by the trainer on top of the same params layout.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from phds_jax.errors import CheckpointError, ConfigError
from phds_jax.io import files
from phds_jax.io import paths
from phds_jax.model.config import ModelConfig, config_from_dict, config_to_dict
from phds_jax.model.layout import param_layout

CONFIG_FILE = "model_config.json"  # load.ORBAX_CONFIG_FILE
PARAMS_DIR = "params"

log = logging.getLogger("phds_jax")


def save_model(cfg: ModelConfig, params: dict[str, Any], directory: str, *, overwrite: bool = False) -> str:
  """Writes `directory/model_config.json` and `directory/params` (orbax). Returns the directory.

  With overwrite, the new copy is written beside the old one and swapped in when complete: a process
  killed at any moment leaves the old copy or the new one (`recover_replaced` restores the old one if the
  kill fell between the two renames). All processes call it; process 0 writes the config and renames.
  `directory` may be in a bucket (the renames then copy objects: see io/files.py).
  """
  directory = paths.resolve(directory, "directory")
  if files.exists(directory) and not overwrite:
    raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it")
  partial, old = directory + _PARTIAL, directory + _OLD
  if jax.process_index() == 0:
    files.remove(partial)
  _sync("phds_save_model_start")
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(partial, PARAMS_DIR), params)
    checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    files.write_text(os.path.join(partial, CONFIG_FILE), json.dumps(config_to_dict(cfg), indent=2, sort_keys=True))
    if files.exists(directory):
      files.remove(old)
      files.rename(directory, old)
    files.rename(partial, directory)
    files.remove(old)
  _sync("phds_save_model_done")
  return directory


def recover_replaced(directory: str) -> None:
  """Puts back the old copy of a `save_model(..., overwrite=True)` killed between its renames, and drops
  an unfinished new copy."""
  directory = paths.resolve(directory, "directory")
  if jax.process_index() != 0:
    return
  if not files.exists(directory) and files.isdir(directory + _OLD):
    files.rename(directory + _OLD, directory)
  files.remove(directory + _PARTIAL)


_PARTIAL, _OLD = ".partial", ".old"


def _sync(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices(name)


def load_model_config(directory: str) -> ModelConfig:
  path = os.path.join(directory, CONFIG_FILE)
  try:
    raw = json.loads(files.read_text(path))
  except FileNotFoundError:
    raise CheckpointError(f"{path} not found: {directory} is not a phds_jax model checkpoint") from None
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path}: malformed JSON ({e})") from None
  return config_from_dict(raw, source=path)


def load_model(directory: str, dtype=None, *, sharding=None) -> tuple[ModelConfig, dict[str, Any]]:
  """Restores (ModelConfig, params) from `save_model`'s directory, optionally casting / placing them.

  sharding: None, one `jax.sharding.Sharding`, or a callable (param path, shape) -> Sharding.
  """
  cfg = load_model_config(directory)
  params_dir = os.path.join(paths.resolve(directory, "directory"), PARAMS_DIR)
  if not files.isdir(params_dir):
    raise CheckpointError(f"{params_dir} not found: the checkpoint has no params")
  layout = param_layout(cfg)
  with ocp.StandardCheckpointer() as checkpointer:
    stored = checkpointer.metadata(params_dir).item_metadata.tree
    if _is_per_layer(stored, layout):
      return cfg, _restore_per_layer(checkpointer, params_dir, stored, layout, dtype, sharding)
    abstract = traverse_util.unflatten_dict(  # the shapes the config implies (abstract: nothing allocated)
        {spec.path: jax.ShapeDtypeStruct(spec.shape, jnp.float32) for spec in layout})

    def target_of(path, a, m):
      if tuple(m.shape) != tuple(a.shape):
        raise ValueError(f"{'/'.join(str(p.key) for p in path)} is stored with shape {list(m.shape)}, "
                         f"the config implies {list(a.shape)}")
      where = sharding(tuple(p.key for p in path), a.shape) if callable(sharding) else sharding
      return jax.ShapeDtypeStruct(a.shape, jnp.dtype(dtype or m.dtype), sharding=where)

    try:
      target = jax.tree_util.tree_map_with_path(target_of, abstract, stored)
    except ValueError as e:
      raise CheckpointError(f"{params_dir}: stored params do not match {CONFIG_FILE} ({e})") from None
    params = checkpointer.restore(params_dir, target)
  return cfg, params


def _per_layer_path(spec, position: int) -> tuple[str, ...]:
  """Where the per-layer layout (before stacked layers) kept layer `spec.layers[position]` of `spec`."""
  return (f"layers_{spec.layers[position]}", *spec.path[1:])


def _is_per_layer(stored, layout) -> bool:
  """Whether a stored params tree has the per-layer layout ("layers_0", "layers_1", ...: before stacking)."""
  return "layers_0" in stored and not any(spec.path[0] == "layers_0" for spec in layout)


def _restore_per_layer(checkpointer, params_dir: str, stored, layout, dtype, sharding) -> dict[str, Any]:
  """Restores a per-layer checkpoint and stacks its layers into the current layout, one parameter at a time
  (each held whole on the host while it is stacked: fine below pod scale; save the model again to convert)."""
  log.warning("%s holds one entry per decoder layer (written before layers were stacked): converting it on "
              "load; save it again (pj.save / phds-convert) to load it directly", params_dir)
  flat_stored = traverse_util.flatten_dict(stored)
  target = {}
  for spec in layout:
    paths_ = [_per_layer_path(spec, j) for j in range(len(spec.layers))] if spec.layers else [spec.path]
    for path in paths_:
      if path not in flat_stored or tuple(flat_stored[path].shape) != spec.layer_shape:
        raise CheckpointError(f"{params_dir}: stored params do not match {CONFIG_FILE} ("
                              f"{'/'.join(path)} missing or not of shape {list(spec.layer_shape)})")
      target[path] = jax.ShapeDtypeStruct(spec.layer_shape, jnp.dtype(dtype or flat_stored[path].dtype))
  restored = traverse_util.flatten_dict(checkpointer.restore(params_dir, traverse_util.unflatten_dict(target)))
  out = {}
  for spec in layout:
    if spec.layers:
      value = np.stack([np.asarray(restored.pop(_per_layer_path(spec, j))) for j in range(len(spec.layers))])
    else:
      value = np.asarray(restored.pop(spec.path))
    where = sharding(spec.path, spec.shape) if callable(sharding) else sharding
    out[spec.path] = jax.device_put(value, where) if where is not None else jnp.asarray(value)
  return traverse_util.unflatten_dict(out)
