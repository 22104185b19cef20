"""Hugging Face checkpoints <-> (ModelConfig, params): `load_pretrained` and `save_pretrained`.

Loading reads config.json and the safetensors tensors one at a time (memory-mapped), checks that every
tensor the model needs is there with the right shape and that nothing unknown is left over, converts
each to our layout and dtype, and places it on a device or sharding. Saving writes config.json plus
(sharded) safetensors in the hub's per-expert layout into a temporary directory renamed into place
only when complete, so a failed save leaves no partial output.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Any, Callable, Optional, Union

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from phds_jax.errors import (MissingTensorError, ShapeMismatchError,
                             UnexpectedTensorError)
from phds_jax.io import files
from phds_jax.io import paths
from phds_jax.io.hf import param_map
from phds_jax.io.hf.config_io import config_from_hf, config_to_hf, load_config, read_config_json
from phds_jax.io.hf.safetensors_io import PendingTensor, scratch_array, write_file
from phds_jax.io.hf.sources import SAFETENSORS_INDEX, SAFETENSORS_SINGLE, open_weights, preview_names
from phds_jax.model.config import ModelConfig

__all__ = ["load_pretrained", "save_pretrained", "load_config", "config_from_hf", "config_to_hf",
           "read_config_json", "declared_dtype"]

log = logging.getLogger("phds_jax")

Params = dict[str, Any]
ShardingSpec = Union[None, jax.sharding.Sharding,
                     Callable[[tuple[str, ...], tuple[int, ...]], jax.sharding.Sharding]]

_DTYPE_NAMES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_WEIGHT_FILES = (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, "config.json", "model_config.json")


def _np_dtype(dtype) -> np.dtype:
  if isinstance(dtype, str):
    if dtype not in _DTYPE_NAMES:
      raise ValueError(f"dtype={dtype!r}; choose one of {sorted(_DTYPE_NAMES)}")
    dtype = _DTYPE_NAMES[dtype]
  dt = np.dtype(dtype)
  if dt.name not in _DTYPE_NAMES:
    raise ValueError(f"dtype={dt.name!r}; choose one of {sorted(_DTYPE_NAMES)}")
  return dt


def declared_dtype(path: str) -> str:
  """The weight dtype `path/config.json` declares, if we support it, else "float32"."""
  raw = read_config_json(os.path.join(path, "config.json"))
  declared = raw.get("dtype", raw.get("torch_dtype"))
  return declared if declared in _DTYPE_NAMES else "float32"


def _check_against_specs(cfg: ModelConfig, source) -> list[param_map.Mapped]:
  """Raises if the checkpoint lacks, adds or mis-shapes any tensor; returns the parameters to load."""
  specs = param_map.param_specs(cfg)
  wanted = {name: m.spec for m in specs for names in m.hf_names for name in names}
  missing = sorted(set(wanted) - source.names)
  if missing:
    raise MissingTensorError(f"checkpoint lacks {len(missing)} tensor(s) the {cfg.model_type} config needs: "
                             f"{preview_names(missing)}")
  extra = sorted(n for n in source.names - set(wanted) if not param_map.is_ignorable(n, cfg))
  if extra:
    raise UnexpectedTensorError(f"checkpoint holds {len(extra)} tensor(s) this {cfg.model_type} config does "
                                f"not use (in {source.file_of(extra[0])}): {preview_names(extra)}")
  for name, spec in wanted.items():
    if source.shape(name) != spec.hf_shape:
      raise ShapeMismatchError(f"tensor {name!r} in {source.file_of(name)} has shape "
                               f"{list(source.shape(name))}; config.json implies {list(spec.hf_shape)}")
  return specs


def load_pretrained(path: str, dtype="float32", *, sharding: ShardingSpec = None,
                    allow_pickle: bool = False) -> tuple[ModelConfig, Params]:
  """Loads an HF model directory (config.json + safetensors) into (ModelConfig, params).

  dtype: "float32" | "bfloat16" | "float16" (or the jnp dtype): every parameter is cast to it.
  sharding: None (default device), one `jax.sharding.Sharding` for every parameter, or a callable
    (param path, shape) -> Sharding. Each device's block is read (only the HF rows it needs), converted
    and placed on its own, so a process reads only what its devices hold.
  allow_pickle: load `.bin` pickle weights with torch.load(weights_only=True); refused otherwise.
  """
  target = _np_dtype(dtype)
  cfg = load_config(path)
  source = open_weights(path, allow_pickle=allow_pickle)
  mapped = _check_against_specs(cfg, source)
  flat: dict[tuple[str, ...], Any] = {}
  total = sum(int(np.prod(m.spec.shape)) for m in mapped)
  done, next_report = 0, 0.1
  for m in mapped:
    spec = m.spec
    where = sharding(spec.path, spec.shape) if callable(sharding) else sharding
    if where is None:
      flat[spec.path] = jnp.asarray(_read_block(m, source, tuple(slice(None) for _ in spec.shape), target))
    else:  # each device's block is read on its own process, only the rows it needs
      flat[spec.path] = jax.make_array_from_callback(
          spec.shape, where, lambda index, m=m: _read_block(m, source, index, target))
    done += int(np.prod(spec.shape))
    if done / total >= next_report:
      log.info("loaded %.0f%% of %s parameters from %s", 100 * done / total, f"{total:,}", path)
      next_report += 0.1
  return cfg, traverse_util.unflatten_dict(flat)


def _read_block(m: param_map.Mapped, source, index: tuple[slice, ...], dtype: np.dtype) -> np.ndarray:
  """One block of a parameter in our layout and `dtype`, in its own scratch memory (see scratch_array)."""
  block = param_map.read_block(m, source.get, index)
  out = scratch_array(block.shape, dtype)
  out[...] = block
  return out


def _to_host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def _pending_tensors(cfg: ModelConfig, params: Params, dtype: np.dtype) -> list[PendingTensor]:
  """Checks `params` against the config and lists the HF tensors to write, each converted lazily."""
  flat = traverse_util.flatten_dict(params)
  specs = param_map.param_specs(cfg)
  wanted = {m.spec.path: m.spec for m in specs}
  missing = sorted("/".join(p) for p in set(wanted) - set(flat))
  if missing:
    raise MissingTensorError(f"params lack {len(missing)} entries the config needs: {preview_names(missing)}")
  extra = sorted("/".join(p) for p in set(flat) - set(wanted))
  if extra:
    raise UnexpectedTensorError(f"params hold {len(extra)} entries the config does not use: {preview_names(extra)}")
  for path, spec in wanted.items():
    if tuple(flat[path].shape) != spec.shape:
      raise ShapeMismatchError(f"param {'/'.join(path)} has shape {list(flat[path].shape)}; the config "
                               f"implies {list(spec.shape)}")
  cache: dict[tuple, np.ndarray] = {}

  def produce(m, j, index):
    key = (m.spec.path, j)
    if key not in cache:
      cache.clear()  # hold one layer of one parameter on the host at a time
      cache[key] = _to_host(flat[m.spec.path][j] if m.spec.layers else flat[m.spec.path])
    return param_map.to_hf(m, cache[key], index).astype(dtype)

  return [PendingTensor(m.hf_names[j][i], m.spec.hf_shape, dtype, lambda m=m, j=j, i=i: produce(m, j, i))
          for m, j, i in param_map.hf_order(specs)]


def _shard(tensors: list[PendingTensor], max_bytes: int) -> list[list[PendingTensor]]:
  shards, current, size = [], [], 0
  for t in tensors:
    nbytes = int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize
    if current and size + nbytes > max_bytes:
      shards.append(current)
      current, size = [], 0
    current.append(t)
    size += nbytes
  return shards + [current]


def save_pretrained(cfg: ModelConfig, params: Params, out_dir: str, *, dtype=None,
                    max_shard_size: int = 5 * 2**30, overwrite: bool = False,
                    copy_files_from: Optional[str] = None) -> str:
  """Writes an HF model directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

  dtype: storage dtype (default: the embedding's dtype). max_shard_size: bytes per safetensors shard;
  more than one shard also writes model.safetensors.index.json. overwrite: replace an existing out_dir.
  copy_files_from: a model directory whose other files (tokenizer, generation config) are copied along.
  Only process 0 writes in a multi-process run; all processes must call it (parameters are gathered).
  out_dir may be in a bucket: the files are written to a local temporary directory, then uploaded.
  Returns out_dir.
  """
  in_bucket = files.is_bucket(out_dir)
  out_dir = paths.resolve(out_dir, "out_dir")
  if files.exists(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
  dtype = _np_dtype(dtype if dtype is not None else params["embed_tokens"]["embedding"].dtype)
  hf_config = config_to_hf(cfg, dtype.name)
  tensors = _pending_tensors(cfg, params, dtype)
  shards = _shard(tensors, max_shard_size)
  is_writer = jax.process_index() == 0
  parent = tempfile.gettempdir() if in_bucket else os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=parent) if is_writer else None
  try:
    weight_map = {}
    for n, shard in enumerate(shards):
      name = SAFETENSORS_SINGLE if len(shards) == 1 else f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
      if is_writer:
        write_file(os.path.join(tmp, name), shard)
      else:
        for t in shard:  # take part in the gathers, discard the data
          t.produce()
      weight_map.update({t.name: name for t in shard})
      log.info("wrote shard %d/%d of %s", n + 1, len(shards), out_dir)
    if not is_writer:
      return out_dir
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
      json.dump(hf_config, f, indent=2, sort_keys=True)
    if len(shards) > 1:
      total = sum(int(np.prod(t.shape)) * dtype.itemsize for t in tensors)
      with open(os.path.join(tmp, SAFETENSORS_INDEX), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    if copy_files_from:
      _copy_side_files(copy_files_from, tmp)
    _replace_dir(tmp, out_dir)
  except BaseException:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir


def _copy_side_files(src: str, dst: str):
  """Copies tokenizer and generation files; never weights or the config we just wrote."""
  for name in sorted(os.listdir(src)):
    path = os.path.join(src, name)
    if (os.path.isfile(path) and name not in _WEIGHT_FILES
        and not name.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5"))):
      shutil.copy2(path, os.path.join(dst, name))


def _replace_dir(tmp: str, out_dir: str):
  """Moves the finished `tmp` to `out_dir`, replacing an old one only after the new one is complete (in a
  bucket: the old objects are removed, then the new ones uploaded)."""
  if files.is_bucket(out_dir):
    files.remove(out_dir)
    files.upload_dir(tmp, out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    return
  old = None
  if os.path.exists(out_dir):
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=os.path.dirname(out_dir))
    os.rename(out_dir, os.path.join(old, "d"))
  os.rename(tmp, out_dir)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
