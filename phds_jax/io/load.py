"""`pj.load`: one way to open a model, whatever its format.

A directory with `model_config.json` is a phds_jax orbax model checkpoint (what training writes as
`best/`); one with `config.json` is a Hugging Face model directory. Both come back as (ModelConfig,
params) in the asked dtype, each parameter placed where `sharding` says.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax

from phds_jax.io import files
from phds_jax.io import hf
from phds_jax.io import paths
from phds_jax.model import layout
from phds_jax.model import sharding as sharding_lib
from phds_jax.errors import CheckpointError

FORMATS = ("hf", "orbax")
ORBAX_CONFIG_FILE = "model_config.json"  # checkpoint.CONFIG_FILE; orbax is imported only to read one


def detect_format(path: str) -> str:
  """'orbax' for a directory with model_config.json, 'hf' for one with config.json."""
  if not files.isdir(path):
    raise CheckpointError(f"{path}: no such model directory")
  if files.isfile(os.path.join(path, ORBAX_CONFIG_FILE)):
    return "orbax"
  if files.isfile(os.path.join(path, "config.json")):
    return "hf"
  raise CheckpointError(f"{path}: neither an HF model directory (config.json) nor a phds_jax checkpoint "
                        f"({ORBAX_CONFIG_FILE})")


def load_config(path: str) -> Any:
  """The ModelConfig of an HF model directory or a phds_jax checkpoint, without reading any weight (`path`
  as `load` takes it)."""
  path = paths.resolve_model(path, "path")
  if detect_format(path) == "hf":
    return hf.config_io.load_config(path)
  from phds_jax.io import checkpoint  # pylint: disable=g-import-not-at-top

  return checkpoint.load_model_config(path)


def model_overrides(config) -> dict[str, Any]:
  """The `model.overrides` a run config sets (every ModelConfig field is a settable placeholder; unset is None)."""
  return {name: value for name, value in dict(config.model.overrides).items() if value is not None}


def run_model_config(config) -> Any:
  """The ModelConfig a run config names, without reading any weight: `model_path`'s (HF directory or
  phds_jax checkpoint), else the random `model.preset` with `model.overrides`. The one place every mode
  and the config checks resolve a run's model."""
  if config.model_path:
    return load_config(config.model_path)
  from phds_jax.model.families import preset  # pylint: disable=g-import-not-at-top

  return preset(config.model.preset).replace(**model_overrides(config))


def load(path: str, dtype: Any = "float32", *, sharding: Any = None,
         allow_pickle: bool = False) -> tuple[Any, dict[str, Any]]:
  """Opens an HF model directory or a phds_jax orbax model checkpoint (detected) as (ModelConfig, params).

  path: a local directory, a `gs://` directory (copied once into the local cache) or a Hugging Face model id
    (its snapshot in the Hugging Face cache).

  dtype: "float32" | "bfloat16" | "float16" (or a jnp dtype), or None to keep the stored dtype.
  sharding: None (default device); a `jax.sharding.Mesh`: each parameter sharded by its logical axes under
    the current axis rules (`phds_jax.sharding.axis_rules`); one `jax.sharding.Sharding`; or a callable
    (param path, shape) -> Sharding. Each process reads only the blocks its own devices hold.
  allow_pickle: HF directories holding only `.bin` pickles load only with this set.
  The expert backend is not a property of the model: pass it to `forward` / `generate` / the evaluators.
  """
  path = paths.resolve_model(path, "path")
  if isinstance(sharding, jax.sharding.Mesh):
    sharding = layout.layout_sharding(sharding, load_config(path))
  if detect_format(path) == "hf":
    return hf.load_pretrained(path, dtype=dtype or hf.declared_dtype(path), sharding=sharding,
                              allow_pickle=allow_pickle)
  from phds_jax.io import checkpoint  # pylint: disable=g-import-not-at-top  (orbax: heavy to import)

  return checkpoint.load_model(path, dtype=dtype, sharding=sharding)


def load_run_model(config, sharding=None) -> tuple[Any, dict[str, Any]]:
  """`model_path` (HF or orbax directory), or a random `model.preset` with `model.overrides`, each
  parameter placed by `sharding` ((path, shape) -> Sharding, e.g. `Trainer.param_sharding()`; None: the
  default device) as it is read or made: no device or host ever holds the whole model."""
  if config.model_path:
    return load(config.model_path, dtype=config.model.param_dtype, sharding=sharding)
  from phds_jax.model.transformer import init_params  # pylint: disable=g-import-not-at-top

  cfg = run_model_config(config)
  make = functools.partial(init_params, cfg, jax.random.key(config.seed), dtype=config.model.param_dtype)
  if sharding is None:
    return cfg, make()
  out_shardings = jax.tree_util.tree_map_with_path(
      lambda path, leaf: sharding(sharding_lib.path_keys(path), leaf.shape), jax.eval_shape(make))
  return cfg, jax.jit(make, out_shardings=out_shardings)()
