"""HF model directory <-> phds_jax orbax model checkpoint, as a library call and as `mode="convert"`."""

from __future__ import annotations

import logging
import os
from typing import Optional

from phds_jax import checkpoint
from phds_jax import hf
from phds_jax.errors import CheckpointError

log = logging.getLogger("phds_jax")

FORMATS = ("hf", "orbax")


def detect_format(path: str) -> str:
  """'hf' for a directory with config.json, 'orbax' for one with model_config.json."""
  if os.path.isfile(os.path.join(path, checkpoint.CONFIG_FILE)):
    return "orbax"
  if os.path.isfile(os.path.join(path, "config.json")):
    return "hf"
  raise CheckpointError(f"{path}: neither an HF model directory (config.json) nor a phds_jax checkpoint "
                        f"({checkpoint.CONFIG_FILE})")


def convert(src: str, dst: str, *, to: Optional[str] = None, dtype: Optional[str] = None,
            overwrite: bool = False, allow_pickle: bool = False, max_shard_size: int = 5 * 2**30) -> str:
  """Converts `src` into format `to` (default: the other one) at `dst`; returns dst.

  dtype: storage dtype of the output ("float32", "bfloat16", "float16"); None keeps the source's.
  """
  source_format = detect_format(src)
  to = to or ("orbax" if source_format == "hf" else "hf")
  if to not in FORMATS:
    raise ValueError(f"to={to!r}; choose one of {FORMATS}")
  if os.path.exists(dst) and not overwrite:
    raise FileExistsError(f"{dst} exists; pass overwrite=True to replace it")
  if source_format == "hf":
    cfg, params = hf.load_pretrained(src, dtype=dtype or _hf_dtype(src), allow_pickle=allow_pickle)
  else:
    cfg, params = checkpoint.load_model(src, dtype=dtype)
  log.info("read %s checkpoint %s (%s)", source_format, src, cfg.model_type)
  if to == "hf":
    copy_from = src if source_format == "hf" else None
    hf.save_pretrained(cfg, params, dst, max_shard_size=max_shard_size, overwrite=overwrite,
                       copy_files_from=copy_from)
  else:
    checkpoint.save_model(cfg, params, dst, overwrite=overwrite)
  log.info("wrote %s checkpoint %s", to, dst)
  return dst


def _hf_dtype(src: str) -> str:
  """The dtype config.json declares for the weights (float32 if it declares none we support)."""
  raw = hf.read_config_json(os.path.join(src, "config.json"))
  declared = raw.get("dtype", raw.get("torch_dtype"))
  return declared if declared in ("float32", "bfloat16", "float16") else "float32"


def run(config) -> str:
  """`mode="convert"` entry point; see configs/convert.py for the fields."""
  if not config.src or not config.dst:
    raise ValueError("convert needs --config.src and --config.dst")
  return convert(config.src, config.dst, to=config.to or None, dtype=config.dtype or None,
                 overwrite=config.overwrite, allow_pickle=config.allow_pickle,
                 max_shard_size=int(config.max_shard_size_gb * 2**30))
