"""PHDS fine-tuning of OLMoE-1B-7B-0125 (k_pre = 8) over k_train in {4..8}, anchored on k = 4.

  python -m phds_jax.main --config=configs/olmoe.py --workdir=/ckpt/olmoe_phds \
      --config.model_path=/models/OLMoE-1B-7B-0125 --config.data.train_files='/data/sft/*.jsonl'
  python -m phds_jax.main --config=configs/olmoe.py:k_values=2,4,8 ...   # another k_train set

Paper-scale defaults for one TPU/GPU host; set `mesh` (e.g. --config.mesh.fsdp=8) for larger slices.
"""

from phds_jax.configs import apply_arg, base_config, paper_scale


def get_config(arg=None):
  config = paper_scale(base_config())
  config.model.preset = "olmoe-1b-7b-0125"  # shapes only; the weights come from model_path
  config.phds.k_values = "4,5,6,7,8"
  config.eval.k_values = "1,2,4,6,8"
  return apply_arg(config, arg)
