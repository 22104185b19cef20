"""Training metrics: TensorBoard scalars (through tensorboardX) and a one-line progress report.

tensorboardX writes the event files TensorBoard reads (`tensorboard --logdir WORKDIR/tensorboard`)
without TensorFlow; MaxText uses it the same way.
"""

from __future__ import annotations

import sys
import time
from typing import Mapping, Optional, TextIO

import jax

from phds_jax.io import files


class SummaryWriter:
  """Scalar summaries into one event file in `logdir`; only process 0 writes in a multi-process run.

  A bucket `logdir` is written in the local cache and copied up by `sync` and `close` (tensorboardX's own
  gs:// writer uploads the whole file on every flush and again when garbage-collected)."""

  def __init__(self, logdir: str):
    self._writer, self._logdir, self._local = None, logdir, logdir
    if files.is_bucket(logdir):
      self._local = files.local_mirror(logdir, files.cache_dir())
    if jax.process_index() == 0:
      import tensorboardX  # pylint: disable=g-import-not-at-top

      self._writer = tensorboardX.SummaryWriter(self._local, flush_secs=30)

  def scalars(self, step: int, values: Mapping[str, float]):
    if self._writer is not None:
      for tag, value in values.items():
        self._writer.add_scalar(tag, float(value), global_step=step)

  def sync(self):
    """Writes what is buffered; a bucket logdir gets a copy of the event files."""
    if self._writer is not None:
      self._writer.flush()
      if self._local != self._logdir:
        files.upload_dir(self._local, self._logdir)

  def close(self):
    if self._writer is not None:
      self.sync()
      self._writer.close()
      self._writer = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class Progress:
  """One line per `log` call: a bar, step/total, the rate since the first step, the ETA, the metrics."""

  def __init__(self, total: int, start_step: int = 0, stream: Optional[TextIO] = None, width: int = 24):
    """stream: where the lines go (None: the sys.stdout of each call, not of the import)."""
    self.total, self.stream, self.width = total, stream, width
    self.start_step, self.start = start_step, time.perf_counter()

  def log(self, step: int, values: Mapping[str, float]):
    done = min(1.0, step / max(1, self.total))
    bar = "#" * int(done * self.width) + "." * (self.width - int(done * self.width))
    elapsed = time.perf_counter() - self.start
    rate = (step - self.start_step) / elapsed if elapsed > 0 and step > self.start_step else 0.0
    eta = f"ETA {_duration((self.total - step) / rate)}" if rate > 0 and step < self.total else ""
    text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    if jax.process_index() == 0:
      print(f"[{bar}] {step}/{self.total} {rate:.2f} step/s {eta} {text}".replace("  ", " "), file=self.stream or sys.stdout,
            flush=True)


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
