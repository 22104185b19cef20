"""JAX's multi-process runtime from the config's `distributed` block.

One process per TPU VM host or GPU node (or several on one machine for tests). Fields left unset are
found the way `jax.distributed.initialize` finds them: from the TPU VM's metadata, or SLURM's
environment (SLURM_*); elsewhere give `coordinator_address`, `num_processes` and `process_id`. CPU
processes exchange collectives through gloo (or MPI).
"""

from __future__ import annotations

from typing import Any, Optional


def initialize(block) -> None:
  """Starts the runtime once (a second call is a no-op); must run before any JAX computation."""
  import jax  # pylint: disable=g-import-not-at-top

  if jax.distributed.is_initialized():
    return
  jax.config.update("jax_cpu_collectives_implementation", block.cpu_collectives)
  jax.distributed.initialize(**initialize_kwargs(block))


def initialize_kwargs(block) -> dict[str, Any]:
  """The arguments `jax.distributed.initialize` gets: only the fields that are set."""
  kwargs: dict[str, Optional[Any]] = {
      "coordinator_address": block.coordinator_address or None,
      "num_processes": block.num_processes if block.num_processes > 0 else None,
      "process_id": block.process_id if block.process_id >= 0 else None,
      "local_device_ids": ([int(i) for i in block.local_device_ids.split(",") if i.strip()]
                           if block.local_device_ids else None),
  }
  return {k: v for k, v in kwargs.items() if v is not None}


def problems(block) -> list[str]:
  """Mistakes in the `distributed` block, one line each."""
  if not block.enabled:
    return []
  out = []
  if block.cpu_collectives not in ("gloo", "mpi"):
    out.append(f"distributed.cpu_collectives={block.cpu_collectives!r}; choose one of gloo, mpi")
  if block.coordinator_address and ":" not in block.coordinator_address:
    out.append(f"distributed.coordinator_address={block.coordinator_address!r}: expected host:port")
  if block.num_processes > 0 and not -1 <= block.process_id < block.num_processes:
    out.append(f"distributed.process_id={block.process_id} is outside [0, {block.num_processes})")
  if block.local_device_ids and not all(i.strip().isdigit() for i in block.local_device_ids.split(",")):
    out.append(f"distributed.local_device_ids={block.local_device_ids!r}: comma-separated integers")
  return out
