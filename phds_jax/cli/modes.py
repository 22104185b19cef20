"""The one registry of the main job's modes: name -> (config check, runner), and `run`, which resolves a
config's paths, checks it and runs its mode.

A mode's check returns one line per mistake (phds_jax/cli/config_check.py); its runner is imported only
when the mode runs, so checking a config never imports the trainer.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable, NamedTuple, Optional

from phds_jax.cli import config_check
from phds_jax.errors import ConfigProblems, PathError


class Mode(NamedTuple):
  check: Callable[[Any], list[str]]  # config -> problems, one line each
  runner: str  # "module:function" taking (config, workdir)


MODES = {
    "train": Mode(config_check.train_problems, "phds_jax.train.loop:train_and_evaluate"),
    "prepare": Mode(config_check.prepare_problems, "phds_jax.data.prepare:run"),
    "builtin": Mode(config_check.builtin_problems, "phds_jax.train.builtin:run"),
    "eval": Mode(config_check.eval_problems, "phds_jax.eval.job:run"),
    "sweep": Mode(config_check.sweep_problems, "phds_jax.eval.sweep:run"),
    "convert": Mode(config_check.convert_problems, "phds_jax.io.convert:run_job"),
    "serve": Mode(config_check.serve_problems, "phds_jax.serve.server:run"),
}


def problems(config) -> list[str]:
  """Every mistake in `config` that can be found without reading weights or data, one line each."""
  if config.mode not in MODES:
    return [f"mode={config.mode!r}; choose one of {', '.join(MODES)}"]
  return config_check.common_problems(config) + MODES[config.mode].check(config)


def resolve_paths(config, workdir: Optional[str], source: str) -> tuple[Any, Optional[str]]:
  """Every path field resolved once against the current directory (ConfigProblems on a bad one)."""
  from phds_jax.io import paths  # pylint: disable=g-import-not-at-top

  try:
    return paths.resolve_config(config, workdir)
  except PathError as e:
    raise ConfigProblems(source, [str(e)]) from None


def enable_compile_cache(setting: str) -> Optional[str]:
  """Turns on JAX's persistent compilation cache (a re-run loads its programs instead of compiling them);
  returns its directory, or None when `compile_cache` is ""."""
  if not setting:
    return None
  import jax  # pylint: disable=g-import-not-at-top

  from phds_jax.io import files  # pylint: disable=g-import-not-at-top

  path = setting if setting != "auto" else (os.environ.get("JAX_COMPILATION_CACHE_DIR") or
                                            os.path.join(files.cache_dir(), "xla"))
  jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.expanduser(path)))
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return path


def run(config, workdir: Optional[str] = None, source: str = "config") -> Any:
  """Resolves and checks `config` (ConfigProblems listing every mistake) and runs its mode here."""
  from phds_jax.cli import distributed  # pylint: disable=g-import-not-at-top
  from phds_jax.io.paths import write_resolved  # pylint: disable=g-import-not-at-top

  config, workdir = resolve_paths(config, workdir, source)
  if not config.compile_topology and config.mode != "prepare":  # a plan's TPU executables cannot be loaded
    enable_compile_cache(config.get("compile_cache", ""))  # back on this machine; prepare compiles nothing
  if config.compile_topology:  # a plan: compiles for the slice, reads no weights or data, starts no runtime
    bad = config_check.plan_problems(config)
    if bad:
      raise ConfigProblems(source, bad)
    from phds_jax.plan import programs as plan  # pylint: disable=g-import-not-at-top
    return plan.run(config, workdir or config.get("workdir", "") or None)
  bad = distributed.problems(config.distributed)
  if bad:
    raise ConfigProblems(source, bad)
  if config.distributed.enabled:
    distributed.initialize(config.distributed)
  bad = problems(config)
  if bad:
    raise ConfigProblems(source, bad)
  workdir = workdir or config.get("workdir", "") or os.path.abspath(os.path.join("workdir", config.mode))
  # training writes it once it knows the workdir is its own; prepare's output is data.prepared
  if config.mode not in ("convert", "train", "serve", "prepare"):
    write_resolved(config, workdir)
  module, function = MODES[config.mode].runner.split(":")
  return getattr(importlib.import_module(module), function)(config, workdir)
