"""Command-line entry point: `python -m phds_jax.main --config=configs/<name>.py [--workdir=DIR]`.

The config's `mode` picks the job: "train" (PHDS fine-tuning), "builtin" (the tiny end-to-end default),
"eval" (accuracy / perplexity / agreement / latency per k), "sweep" (run a model at several k),
"convert" (HF <-> orbax). Every config file's docstring holds its launch command.

The config is checked before any heavy work (phds_jax/cli/config_check.py): all mistakes are reported at once,
one line each naming the field, with exit status 2. Library logs (orbax, absl, transformers) and the
Python traceback of a user error appear only with `--verbosity=1` or `--config.verbose=True`.
"""

import os
import re
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from phds_jax.cli.logs import set_log_levels

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: the config's `workdir`).")


def _fail(message: str, status: int):
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(status)


def _parse_flags(argv):
  """absl's parsing, with a config file or field that cannot be read reported in one line (exit 2)."""
  verbose = any(a in ("--verbosity=1", "-v=1") for a in argv)
  for arg in argv[1:]:  # a missing config file fails only when first read, with a long traceback
    if arg.startswith("--config=") and not os.path.isfile(arg.split("=", 1)[1].split(":", 1)[0]):
      _fail(f"{arg}: no such config file (the files are in configs/, e.g. --config=configs/tiny.py)", 2)
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  (config_flags raises many kinds)
    if verbose:
      raise
    _fail(_flag_error(e, argv), 2)


def _flag_error(error: Exception, argv) -> str:
  """One line naming the command-line item at fault (config_flags' own message often names neither)."""
  cause = error
  while cause.__cause__ is not None or cause.__context__ is not None:
    cause = cause.__cause__ or cause.__context__
  detail = str(cause).strip("\"'")
  overrides = [a for a in argv if a.startswith("--config.") and "=" in a]
  if isinstance(cause, KeyError):
    given = [a for a in overrides if f".{detail}" in a.split("=", 1)[0]]
    return (f"no config field {detail!r}" + (f" (in {given[0]})" if given else "") +
            "; every field is listed in docs/configs.md")
  literal = re.search(r": '(.*)$", detail)  # int('abc') / float('x'): find the item with that value
  given = [a for a in overrides if literal and a.split("=", 1)[1] == literal.group(1)]
  if given:
    field, value = given[0][len("--config."):].split("=", 1)
    return f"--config.{field}={value}: {value!r} is not a valid value for {field} ({detail})"
  return detail


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  verbose = flags.FLAGS.verbosity >= 1 or bool(config.get("verbose", False))
  set_log_levels(verbose)
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
  """Resolves every path, checks `config` (raising ConfigProblems listing every mistake) and runs its mode
  in this process: what the command line does after parsing its flags; tests and notebooks call it.
  workdir: output directory (default: the config's `workdir`, else workdir/<mode>)."""
  from phds_jax.cli import modes  # pylint: disable=g-import-not-at-top

  return modes.run(config, workdir, source)


if __name__ == "__main__":
  from phds_jax.platforms import use_cpu_without_accelerator  # pylint: disable=g-import-not-at-top

  use_cpu_without_accelerator()
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=_parse_flags)
