"""Run one model at several k: next-token agreement with k_pre, KL, and forward time per k.

  python -m phds_jax.main --config=configs/sweep.py --workdir=/tmp/phds_sweep

Without `model_path` it builds a random tiny model, exports it as a Hugging Face directory in the
workdir, reads it back and sweeps k: next-token agreement with k_pre, KL, and forward time per k.
Point `model_path` at any HF or orbax checkpoint to sweep that model instead:
  python -m phds_jax.main --config=configs/sweep.py --config.model_path=/models/OLMoE-1B-7B-0125 \
      --config.k_values=1,2,4,8 --config.dtype=bfloat16
"""

import ml_collections


def get_config(arg=None):
  del arg
  config = ml_collections.ConfigDict()
  config.mode = "sweep"
  config.workdir = "workdir/sweep"  # overridden by --workdir
  config.model_path = ""  # HF or orbax checkpoint; "" builds a random `preset`
  config.preset = "tiny-olmoe"  # see phds_jax.PRESETS
  config.dtype = "float32"  # parameter / compute dtype
  config.k_values = (1, 2, 4, 8)  # k to run at (those above num_experts are dropped)
  config.batch_size = 4  # sequences per forward
  config.seq_len = 128  # tokens per sequence
  config.repeats = 5  # timed forwards per k (median reported)
  config.seed = 0
  return config
