"""Command-line entry point: `python -m phds_jax.main --config=configs/<name>.py [--workdir=DIR]`.

The config's `mode` picks the job: "train" (PHDS fine-tuning), "builtin" (the tiny end-to-end default),
"eval" (accuracy / perplexity / agreement / latency per k), "sweep" (run a model at several k),
"convert" (HF <-> orbax).
Every config file's docstring holds its launch command.
"""

import logging
import os

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: the config's `workdir`).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger("phds_jax").setLevel(logging.INFO)
  config = _CONFIG.value
  if config.get("distributed", False):
    jax.distributed.initialize()
  workdir = _WORKDIR.value or config.get("workdir", "") or os.path.join("workdir", config.mode)
  if config.mode != "convert" and jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json(indent=2))  # the resolved config of this run
  if config.mode == "train":
    from phds_jax import train  # pylint: disable=g-import-not-at-top
    train.train_and_evaluate(config, workdir)
  elif config.mode == "builtin":
    from phds_jax import builtin  # pylint: disable=g-import-not-at-top
    builtin.run(config, workdir)
  elif config.mode == "eval":
    from phds_jax import eval_job  # pylint: disable=g-import-not-at-top
    eval_job.run(config, workdir)
  elif config.mode == "sweep":
    from phds_jax import sweep  # pylint: disable=g-import-not-at-top
    sweep.run(config, workdir)
  elif config.mode == "convert":
    from phds_jax import convert  # pylint: disable=g-import-not-at-top
    print(f"wrote {convert.run(config)}")
  else:
    raise app.UsageError(f"config.mode={config.mode!r}; expected train, builtin, eval, sweep or convert")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
