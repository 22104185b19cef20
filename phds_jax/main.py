"""Command-line entry point: `python -m phds_jax.main --config=configs/<name>.py [--workdir=DIR]`.

The config's `mode` picks the job: "train" (PHDS fine-tuning), "builtin" (the tiny end-to-end default),
"eval" (accuracy / perplexity / agreement / latency per k), "sweep" (run a model at several k),
"convert" (HF <-> orbax). Every config file's docstring holds its launch command.

The config is checked before any heavy work (phds_jax/cli/config_check.py): all mistakes are reported at once,
one line each naming the field, with exit status 2. Library logs (orbax, absl, transformers) and the
Python traceback of a user error appear only with `--verbosity=1` or `--config.verbose=True`.
"""

import logging
import os
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: the config's `workdir`).")


def _fail(message: str, status: int):
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(status)


def _parse_flags(argv):
  """absl's parsing, with a config file or field that cannot be read reported in one line (exit 2)."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  (config_flags raises many kinds)
    if any(a in ("--verbosity=1", "-v=1") for a in argv):
      raise
    cause = e
    while cause.__cause__ is not None or cause.__context__ is not None:
      cause = cause.__cause__ or cause.__context__
    detail = str(cause).strip("\"'")
    if isinstance(cause, KeyError):
      given = [a for a in argv if a.startswith("--config.") and f".{detail}" in a.split("=", 1)[0]]
      detail = (f"no config field {detail!r}" + (f" (in {given[0]})" if given else "") +
                "; every field is listed in phds_jax/cli/configs.py")
    _fail(detail, 2)


def _set_log_levels(verbose: bool):
  """Library INFO logs only when verbose; our own progress goes to stdout either way."""
  if verbose:
    absl_logging.set_verbosity(absl_logging.INFO)
    logging.getLogger("phds_jax").setLevel(logging.INFO)
    return
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("phds_jax").setLevel(logging.WARNING)
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # also silences "PyTorch was not found"
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  verbose = flags.FLAGS.verbosity >= 1 or bool(config.get("verbose", False))
  _set_log_levels(verbose)
  from phds_jax.errors import ConfigProblems, PhdsError  # pylint: disable=g-import-not-at-top

  try:
    run(config, _WORKDIR.value, source=config_flags.get_config_filename(flags.FLAGS["config"]))
  except ConfigProblems as e:
    _fail(str(e), 2)
  except (PhdsError, ValueError, FileNotFoundError, FileExistsError) as e:
    if verbose:
      raise
    _fail(f"{e}\n(run again with --verbosity=1 for the traceback)", 1)


def run(config, workdir=None, source: str = "config"):
  """Checks `config` (raising ConfigProblems listing every mistake) and runs its job in this process.

  This is what the command line does after parsing its flags; tests and notebooks call it directly.
  workdir: output directory (default: the config's `workdir`, else workdir/<mode>).
  """
  from phds_jax.cli import config_check  # pylint: disable=g-import-not-at-top
  from phds_jax.io.paths import write_resolved  # pylint: disable=g-import-not-at-top
  from phds_jax.errors import ConfigProblems  # pylint: disable=g-import-not-at-top

  from phds_jax.cli import distributed  # pylint: disable=g-import-not-at-top

  if config.compile_topology:  # a plan: compiles for the slice, reads no weights or data, starts no runtime
    problems = config_check.plan_problems(config)
    if problems:
      raise ConfigProblems(source, problems)
    from phds_jax.plan import programs as plan  # pylint: disable=g-import-not-at-top
    return plan.run(config, workdir or config.get("workdir", "") or None)
  bad = distributed.problems(config.distributed)
  if bad:
    raise ConfigProblems(source, bad)
  if config.distributed.enabled:
    distributed.initialize(config.distributed)
  problems = config_check.problems(config)
  if problems:
    raise ConfigProblems(source, problems)
  workdir = workdir or config.get("workdir", "") or os.path.join("workdir", config.mode)
  if config.mode not in ("convert", "train"):  # training writes it once it knows the workdir is its own
    write_resolved(config, workdir)
  if config.mode == "train":
    from phds_jax.train import loop as train  # pylint: disable=g-import-not-at-top
    return train.train_and_evaluate(config, workdir)
  if config.mode == "builtin":
    from phds_jax.train import builtin  # pylint: disable=g-import-not-at-top
    return builtin.run(config, workdir)
  if config.mode == "eval":
    from phds_jax.eval import job as eval_job  # pylint: disable=g-import-not-at-top
    return eval_job.run(config, workdir)
  if config.mode == "sweep":
    from phds_jax.eval import sweep  # pylint: disable=g-import-not-at-top
    return sweep.run(config, workdir)
  from phds_jax.io import convert  # pylint: disable=g-import-not-at-top
  out = convert.run(config)
  print(f"wrote {out}")
  return out


if __name__ == "__main__":
  from phds_jax.platforms import use_cpu_without_accelerator  # pylint: disable=g-import-not-at-top

  use_cpu_without_accelerator()
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=_parse_flags)
