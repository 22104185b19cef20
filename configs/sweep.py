"""Run one model at several k: next-token agreement with k_pre, KL, and forward time per k.

  python -m phds_jax.main --config=configs/sweep.py --workdir=/tmp/phds_sweep

Without `model_path` it builds a random `model.preset` (tiny-olmoe), exports it as a Hugging Face
directory in the workdir, reads it back and sweeps k. Point `model_path` at any HF or orbax checkpoint to
sweep that model instead:
  python -m phds_jax.main --config=configs/sweep.py --config.model_path=/models/OLMoE-1B-7B-0125 \
      --config.eval.k_values=1,2,4,8 --config.model.param_dtype=bfloat16
Fields: phds_jax/cli/configs.py (eval.k_values, eval.batch_size, data.seq_len, eval.latency.repeats).
"""

from phds_jax.cli.configs import apply_arg, base_config


def get_config(arg=None):
  config = base_config()
  config.mode = "sweep"
  config.workdir = "workdir/sweep"  # overridden by --workdir
  config.model.random_init = True  # used only when model_path is empty
  config.eval.batch_size = 4  # sequences per forward
  config.data.seq_len = 128  # tokens per sequence
  config.eval.latency.repeats = 5  # timed forwards per k (median reported)
  return apply_arg(config, arg)
