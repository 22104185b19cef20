"""PHDS fine-tuning of Mixtral-8x7B (k_pre = 2) over k_train in {1, 2}, anchored on k = 1.

  python -m phds_jax.main --config=configs/mixtral.py --workdir=/ckpt/mixtral_phds \
      --config.model_path=/models/Mixtral-8x7B-v0.1 --config.data.train_files='/data/sft/*.jsonl'

Our defaults (the paper does not cover Mixtral). Mixtral checkpoints with a non-null `sliding_window`
are refused (sliding-window attention is not implemented). Set `mesh` for larger slices.
"""

from phds_jax.cli.configs import apply_arg, base_config, paper_scale


def get_config(arg=None):
  config = paper_scale(base_config())
  config.model.preset = "mixtral-8x7b"  # shapes only; the weights come from model_path
  config.phds.k_values = "1,2"
  config.eval.k_values = "1,2"
  return apply_arg(config, arg)
