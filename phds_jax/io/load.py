"""`pj.load`: one way to open a model, whatever its format.

A directory with `model_config.json` is a phds_jax orbax model checkpoint (what training writes as
`best/`); one with `config.json` is a Hugging Face model directory. Both come back as (ModelConfig,
params) in the asked dtype, each parameter placed where `sharding` says.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from phds_jax.io import hf
from phds_jax.model import sharding as sharding_lib
from phds_jax.errors import CheckpointError

FORMATS = ("hf", "orbax")
ORBAX_CONFIG_FILE = "model_config.json"  # checkpoint.CONFIG_FILE; orbax is imported only to read one


def detect_format(path: str) -> str:
  """'orbax' for a directory with model_config.json, 'hf' for one with config.json."""
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: no such model directory")
  if os.path.isfile(os.path.join(path, ORBAX_CONFIG_FILE)):
    return "orbax"
  if os.path.isfile(os.path.join(path, "config.json")):
    return "hf"
  raise CheckpointError(f"{path}: neither an HF model directory (config.json) nor a phds_jax checkpoint "
                        f"({ORBAX_CONFIG_FILE})")


def load_config(path: str) -> Any:
  """The ModelConfig of an HF model directory or a phds_jax checkpoint, without reading any weight."""
  if detect_format(path) == "hf":
    return hf.config_io.load_config(path)
  from phds_jax.io import checkpoint  # pylint: disable=g-import-not-at-top

  return checkpoint.load_model_config(path)


def load(path: str, dtype: Any = "float32", *, sharding: Any = None,
         allow_pickle: bool = False) -> tuple[Any, dict[str, Any]]:
  """Opens an HF model directory or a phds_jax orbax model checkpoint (detected) as (ModelConfig, params).

  dtype: "float32" | "bfloat16" | "float16" (or a jnp dtype), or None to keep the stored dtype.
  sharding: None (default device); a `jax.sharding.Mesh`: each parameter sharded by its logical axes under
    the current axis rules (`phds_jax.sharding.axis_rules`); one `jax.sharding.Sharding`; or a callable
    (param path, shape) -> Sharding. Each process reads only the blocks its own devices hold.
  allow_pickle: HF directories holding only `.bin` pickles load only with this set.
  The expert backend is not a property of the model: pass it to `forward` / `generate` / the evaluators.
  """
  if isinstance(sharding, jax.sharding.Mesh):
    sharding = sharding_lib.layout_sharding(sharding, load_config(path))
  if detect_format(path) == "hf":
    return hf.load_pretrained(path, dtype=dtype or hf.declared_dtype(path), sharding=sharding,
                              allow_pickle=allow_pickle)
  from phds_jax.io import checkpoint  # pylint: disable=g-import-not-at-top  (orbax: heavy to import)

  return checkpoint.load_model(path, dtype=dtype, sharding=sharding)
