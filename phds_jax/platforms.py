"""Which JAX platform a process uses when nothing says so.

With `libtpu` installed (the `[tpu]` extra, which the test extra pulls for compile plans), JAX probes
for TPU chips at start-up and, on a machine without any, prints pages of libtpu warnings before falling
back to the CPU. `use_cpu_without_accelerator()` skips that probe where no accelerator device is visible.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

# device files of TPU chips (v4/v5e: /dev/accel*, v5p/v6e: /dev/vfio/*), NVIDIA and AMD GPUs
_ACCELERATOR_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd")

# libtpu's environment on a machine that is no TPU VM: compile-only use (topology descriptions), quiet
# (several processes may compile at once, e.g. test workers: libtpu's single-process lockfile is skipped)
_COMPILE_ONLY_TPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5litepod-4",
                         "TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0",
                         "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def accelerator_visible() -> bool:
  return any(glob.glob(pattern) for pattern in _ACCELERATOR_FILES)


def use_cpu_without_accelerator() -> None:
  """JAX_PLATFORMS=cpu when unset, libtpu is installed and no accelerator device is visible; call it before
  JAX's first computation."""
  if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None or accelerator_visible():
    return
  os.environ["JAX_PLATFORMS"] = "cpu"
  if "jax" in sys.modules:  # imported already (config files import it); the backend is not started yet
    sys.modules["jax"].config.update("jax_platforms", "cpu")


def use_cpu_threads(threads: int) -> None:
  """For benchmarks, before JAX is imported: XLA's CPU thread count (unless XLA_FLAGS is set already) and
  `use_cpu_without_accelerator`."""
  os.environ.setdefault("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={threads}")
  use_cpu_without_accelerator()


def prepare_compile_only_tpu() -> None:
  """For compiling TPU programs on any machine (jax.experimental.topologies): the local backend is the
  CPU, and where no TPU is visible libtpu gets the settings that keep it from probing for one."""
  os.environ["JAX_PLATFORMS"] = "cpu"
  if "jax" in sys.modules:
    sys.modules["jax"].config.update("jax_platforms", "cpu")
  if not accelerator_visible():
    for name, value in _COMPILE_ONLY_TPU_ENV.items():
      os.environ.setdefault(name, value)
