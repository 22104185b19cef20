"""Lazy safetensors reading and streaming writing (bfloat16 included, via ml_dtypes).

Only the header is parsed up front; a tensor's bytes are read when it is asked for, into a buffer the
caller drops after converting it, so converting a checkpoint holds one raw tensor at a time on the host.
The format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the raw bytes.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from typing import Callable, NamedTuple, Optional

import ml_dtypes
import numpy as np

from phds_jax.errors import CheckpointError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_CODES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
  """One .safetensors file: header parsed eagerly and validated, tensor data mapped lazily."""

  def __init__(self, path: str):
    self.path = path
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
      (header_len,) = struct.unpack("<Q", head)
      if header_len > min(size - 8, _MAX_HEADER):
        raise CheckpointError(f"{path}: corrupt safetensors header length {header_len}")
      try:
        header = json.loads(f.read(header_len))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    self.metadata = header.pop("__metadata__", None) or {}
    self._data_start = 8 + header_len
    data_size = size - self._data_start
    self._entries = {}
    for name, entry in header.items():
      try:
        dtype = DTYPES[entry["dtype"]]
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(o) for o in entry["data_offsets"])
      except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {entry!r}") from None
      if end - begin != int(np.prod(shape)) * dtype.itemsize or not 0 <= begin <= end <= data_size:
        raise CheckpointError(f"{path}: tensor {name!r} byte range {begin}..{end} does not fit its "
                              f"shape {shape} {entry['dtype']} or the file size")
      self._entries[name] = (dtype, shape, begin, end)

  @property
  def names(self) -> list[str]:
    return list(self._entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name][1]

  def dtype(self, name: str) -> np.dtype:
    return self._entries[name][0]

  def get(self, name: str, index: Optional[tuple[slice, ...]] = None) -> np.ndarray:
    """Reads one tensor, or only its block `index` (one step-1 slice per dimension), from disk into a new
    scratch array (see `scratch_array`). A block is copied out of a read-only map of the file, so only
    the pages holding it are read."""
    dtype, shape, begin, end = self._entries[name]
    if index is not None and shape:
      mapped = np.memmap(self.path, dtype=dtype, mode="r", offset=self._data_start + begin, shape=shape)
      block = mapped[tuple(index)]
      out = scratch_array(block.shape, dtype)
      out[...] = block
      del block, mapped
      return out
    out = scratch_array(shape, dtype)
    with open(self.path, "rb") as f:
      f.seek(self._data_start + begin)
      if f.readinto(out.reshape(-1).view(np.uint8)) != end - begin:
        raise CheckpointError(f"{self.path}: tensor {name!r} is truncated")
    return out


def scratch_array(shape: tuple[int, ...], dtype) -> np.ndarray:
  """A zeroed array in its own anonymous memory map, returned to the OS as soon as it is dropped.

  malloc'd buffers of tensor size are often kept by the allocator after being freed, which makes a
  checkpoint load peak near two model copies; private maps avoid that.
  """
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape)) * dtype.itemsize
  if nbytes == 0:
    return np.zeros(shape, dtype)
  return np.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).reshape(shape)


class PendingTensor(NamedTuple):
  """A tensor to write: its name, shape and dtype now, its data from `produce()` when its turn comes."""

  name: str
  shape: tuple[int, ...]
  dtype: np.dtype
  produce: Callable[[], np.ndarray]


def write_file(path: str, tensors: list[PendingTensor], metadata: Optional[dict] = None):
  """Writes `tensors` to `path`, producing and releasing them one at a time."""
  header, offset = {}, 0
  for t in tensors:
    if np.dtype(t.dtype) not in _CODES:
      raise CheckpointError(f"cannot store tensor {t.name!r} of dtype {t.dtype} in safetensors")
    nbytes = int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize
    header[t.name] = {"dtype": _CODES[np.dtype(t.dtype)], "shape": list(t.shape),
                      "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  header["__metadata__"] = {"format": "pt", **(metadata or {})}
  blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for t in tensors:
      arr = np.ascontiguousarray(t.produce(), dtype=t.dtype)
      if arr.shape != tuple(t.shape):
        raise CheckpointError(f"tensor {t.name!r}: produced shape {arr.shape}, declared {t.shape}")
      f.write(memoryview(arr.reshape(-1).view(np.uint8)))
