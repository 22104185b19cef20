"""Training metrics: a dependency-free TensorBoard event-file writer and a one-line progress bar.

TensorBoard reads `events.out.tfevents.*` files: TFRecord framing (length, masked CRC-32C, payload,
masked CRC-32C) around `Event` protocol buffers, which we encode by hand for scalar summaries.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time
from typing import Mapping, TextIO

_CRC_TABLE = []
for _n in range(256):
  _c = _n
  for _ in range(8):
    _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
  _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
  out = bytearray()
  while True:
    byte = value & 0x7F
    value >>= 7
    if value:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
  return _varint((number << 3) | wire) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
  return _field(number, 2, _varint(len(data)) + data)


def encode_event(step: int, wall_time: float, scalars: Mapping[str, float] | None = None,
                 file_version: str | None = None) -> bytes:
  """An `Event` proto: wall_time=1 (double), step=2 (int64), file_version=3, summary=5."""
  out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
  if file_version is not None:
    out += _bytes_field(3, file_version.encode())
  if scalars:
    values = b"".join(
        _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", float(value))))
        for tag, value in scalars.items())
    out += _bytes_field(5, values)
  return out


def frame(record: bytes) -> bytes:
  length = struct.pack("<Q", len(record))
  return length + struct.pack("<I", _masked_crc(length)) + record + struct.pack("<I", _masked_crc(record))


class SummaryWriter:
  """Appends scalar summaries to one event file in `logdir`."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, "ab")
    self._file.write(frame(encode_event(0, time.time(), file_version="brain.Event:2")))
    self._file.flush()

  def scalars(self, step: int, values: Mapping[str, float]):
    self._file.write(frame(encode_event(step, time.time(), values)))
    self._file.flush()

  def close(self):
    self._file.close()


class Progress:
  """A single-line progress bar with the latest metrics; prints a new line at each `log` call."""

  def __init__(self, total: int, stream: TextIO = sys.stdout, width: int = 24):
    self.total, self.stream, self.width = total, stream, width
    self.start = time.perf_counter()

  def log(self, step: int, values: Mapping[str, float]):
    done = min(1.0, step / max(1, self.total))
    bar = "#" * int(done * self.width) + "." * (self.width - int(done * self.width))
    elapsed = time.perf_counter() - self.start
    rate = step / elapsed if elapsed > 0 else 0.0
    text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    print(f"[{bar}] {step}/{self.total} {rate:.2f} step/s {text}", file=self.stream, flush=True)
