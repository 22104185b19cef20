"""Where HF weights come from: single or sharded safetensors, or (opt-in only) pickle `.bin` files."""

from __future__ import annotations

import glob
import json
import os
from typing import Callable, Optional

import ml_dtypes
import numpy as np

from phds_jax.errors import CheckpointError, MissingShardError, MissingTensorError, UnsafeWeightsError
from phds_jax.io.hf.safetensors_io import SafetensorsFile

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.bin", "*.pt", "*.pth", "*.ckpt")


class TensorSource:
  """Name -> (file, shape, lazy reader) for every tensor of a checkpoint directory."""

  def __init__(self):
    self._where: dict[str, tuple[str, tuple[int, ...], Callable[[Optional[tuple[slice, ...]]], np.ndarray]]] = {}

  def add(self, name: str, file: str, shape: tuple[int, ...], read: Callable[[Optional[tuple[slice, ...]]], np.ndarray]):
    if name in self._where:
      raise CheckpointError(f"tensor {name!r} appears in both {self._where[name][0]} and {file}")
    self._where[name] = (file, tuple(shape), read)

  @property
  def names(self) -> set[str]:
    return set(self._where)

  def file_of(self, name: str) -> str:
    return self._where[name][0]

  def shape(self, name: str) -> tuple[int, ...]:
    return self._where[name][1]

  def get(self, name: str, index: Optional[tuple[slice, ...]] = None) -> np.ndarray:
    """The tensor, or only its block `index` (one slice per dimension; read alone from safetensors)."""
    return self._where[name][2](index)


def _add_safetensors(source: TensorSource, path: str, only: set[str] | None = None):
  f = SafetensorsFile(path)
  for name in f.names:
    if only is None or name in only:
      source.add(name, path, f.shape(name), lambda index, f=f, name=name: f.get(name, index))
  return f


def _from_index(model_dir: str) -> TensorSource:
  index_path = os.path.join(model_dir, SAFETENSORS_INDEX)
  try:
    with open(index_path, encoding="utf-8") as fh:
      weight_map = json.load(fh)["weight_map"]
    if not isinstance(weight_map, dict):
      raise TypeError("weight_map is not an object")
  except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
    raise CheckpointError(f"{index_path}: malformed safetensors index ({e!r})") from None
  by_file: dict[str, set[str]] = {}
  for name, file in weight_map.items():
    by_file.setdefault(file, set()).add(name)
  missing = sorted(f for f in by_file if not os.path.isfile(os.path.join(model_dir, f)))
  if missing:
    raise MissingShardError(f"{index_path} names shard files that do not exist in {model_dir}: {missing}")
  source = TensorSource()
  for file, names in sorted(by_file.items()):
    path = os.path.join(model_dir, file)
    stored = set(_add_safetensors(source, path, only=names).names)
    absent = sorted(names - stored)
    if absent:
      raise MissingTensorError(f"{path} lacks tensors that {index_path} assigns to it: "
                               f"{preview_names(absent)}")
  return source


def _from_pickle(files: list[str]) -> TensorSource:
  import torch  # pylint: disable=g-import-not-at-top  (only for explicit opt-in)

  source = TensorSource()
  for path in files:
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    for name, tensor in state.items():
      source.add(name, path, tuple(tensor.shape),
                 lambda index, t=tensor: _torch_to_numpy(t if index is None else t[index]))
  return source


def _torch_to_numpy(t) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top

  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def open_weights(model_dir: str, allow_pickle: bool = False) -> TensorSource:
  """Indexes the weights of an HF model directory without reading tensor data."""
  if not os.path.isdir(model_dir):
    raise MissingShardError(f"{model_dir}: not a directory")
  if os.path.isfile(os.path.join(model_dir, SAFETENSORS_INDEX)):
    return _from_index(model_dir)
  single = os.path.join(model_dir, SAFETENSORS_SINGLE)
  shards = [single] if os.path.isfile(single) else sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
  if shards:
    source = TensorSource()
    for path in shards:
      _add_safetensors(source, path)
    return source
  pickles = sorted({p for pattern in PICKLE_PATTERNS for p in glob.glob(os.path.join(model_dir, pattern))})
  if pickles:
    if not allow_pickle:
      raise UnsafeWeightsError(
          f"{model_dir} holds only pickle weights ({[os.path.basename(p) for p in pickles]}); pickle files "
          "can run arbitrary code when loaded. Convert them to safetensors, or pass allow_pickle=True to "
          "load them with torch.load(weights_only=True).")
    return _from_pickle(pickles)
  raise MissingShardError(f"{model_dir}: no weights found (expected {SAFETENSORS_SINGLE} or "
                          f"{SAFETENSORS_INDEX} with its shards)")


def preview_names(names: list[str], limit: int = 8) -> str:
  shown = ", ".join(names[:limit])
  return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")
