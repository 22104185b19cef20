"""HF model directory <-> phds_jax orbax model checkpoint, as a library call and as `mode="convert"`."""

from __future__ import annotations

import logging
from typing import Optional

from phds_jax.io import checkpoint
from phds_jax.io import files
from phds_jax.io import hf
from phds_jax.io import paths
from phds_jax.io.load import FORMATS, detect_format, load

log = logging.getLogger("phds_jax")


def convert(src: str, dst: str, *, to: Optional[str] = None, dtype: Optional[str] = None,
            overwrite: bool = False, allow_pickle: bool = False, max_shard_size: int = 5 * 2**30) -> str:
  """Converts `src` into format `to` (default: the other one) at `dst`; returns dst.

  dtype: storage dtype of the output ("float32", "bfloat16", "float16"); None keeps the source's.
  """
  src = paths.resolve_model(src, "src")
  source_format = detect_format(src)
  to = to or ("orbax" if source_format == "hf" else "hf")
  if to not in FORMATS:
    raise ValueError(f"to={to!r}; choose one of {FORMATS}")
  if files.exists(dst) and not overwrite:
    raise FileExistsError(f"{dst} exists; pass overwrite=True to replace it")
  cfg, params = load(src, dtype=dtype, allow_pickle=allow_pickle)
  log.info("read %s checkpoint %s (%s)", source_format, src, cfg.model_type)
  if to == "hf":
    copy_from = src if source_format == "hf" else None
    hf.save_pretrained(cfg, params, dst, max_shard_size=max_shard_size, overwrite=overwrite,
                       copy_files_from=copy_from)
  else:
    checkpoint.save_model(cfg, params, dst, overwrite=overwrite)
  log.info("wrote %s checkpoint %s", to, dst)
  return dst


def run_job(config, workdir: str) -> str:
  """`mode="convert"` entry point (the workdir is unused); see configs/convert.py for the fields."""
  del workdir
  c = config.convert
  if not config.model_path or not c.dst:
    raise ValueError("convert needs --config.model_path (the source) and --config.convert.dst")
  out = convert(config.model_path, c.dst, to=c.to or None, dtype=config.model.param_dtype or None,
                 overwrite=c.overwrite, allow_pickle=c.allow_pickle, max_shard_size=int(c.max_shard_size_gb * 2**30))
  print(f"wrote {out}", flush=True)
  return out
