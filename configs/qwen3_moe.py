"""PHDS fine-tuning of Qwen3-30B-A3B (k_pre = 8) over k_train in {4..8}, anchored on k = 4.

  python -m phds_jax.main --config=configs/qwen3_moe.py --workdir=/ckpt/qwen3_phds \
      --config.model_path=/models/Qwen3-30B-A3B --config.data.train_files='/data/sft/*.jsonl'
  python -m phds_jax.main --config=configs/qwen3_moe.py:k_values=2,4,8 ...   # another k_train set

Our defaults (the paper does not cover Qwen3); set `mesh` (e.g. --config.mesh.fsdp=8) for larger slices.
"""

from phds_jax.cli.configs import apply_arg, base_config, paper_scale


def get_config(arg=None):
  config = paper_scale(base_config())
  config.model.preset = "qwen3-30b-a3b"  # shapes only; the weights come from model_path
  config.phds.k_values = "4,5,6,7,8"
  config.eval.k_values = "1,2,4,6,8"
  return apply_arg(config, arg)
