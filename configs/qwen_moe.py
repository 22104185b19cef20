"""PHDS fine-tuning of Qwen1.5-MoE-A2.7B (k_pre = 4) over k_train in {1..4}, anchored on k = 1.

  python -m phds_jax.main --config=configs/qwen_moe.py --workdir=/ckpt/qwen_phds \
      --config.model_path=/models/Qwen1.5-MoE-A2.7B --config.data.train_files='/data/sft/*.jsonl'
  python -m phds_jax.main --config=configs/qwen_moe.py:k_values=2,4 ...
"""

from phds_jax.configs import apply_arg, base_config, paper_scale


def get_config(arg=None):
  config = paper_scale(base_config())
  config.model.preset = "qwen1.5-moe-a2.7b"  # shapes only; the weights come from model_path
  config.phds.k_values = "1,2,3,4"
  config.eval.k_values = "1,2,3,4"
  return apply_arg(config, arg)
