"""PHDS fine-tuning of Qwen3-30B-A3B (k_pre = 8) over k_train in {4..8}, anchored on k = 4.

  python -m phds_jax.main --config=configs/qwen3_moe.py --workdir=/ckpt/qwen3_phds \
      --config.model_path=/models/Qwen3-30B-A3B --config.data.train_files='/data/sft/*.jsonl'
  python -m phds_jax.main --config=configs/qwen3_moe.py:k_values=2,4,8 ...   # another k_train set

Our defaults (the paper does not cover Qwen3). Sized for a TPU v5p-32 slice (16 chips of 95 GiB, 4 hosts):
parameters and optimizer state sharded over all 16 chips (mesh.fsdp=-1), 64 x 2048 tokens per step as 4
micro-batches, every decoder layer recomputed in the backward pass, the chunked expert backend. The plan,
on any machine with `pip install -e ".[tpu]"` (1 min 45 s and 3.4 GB of host memory on 2 cores):

  python -m phds_jax.main --config=configs/qwen3_moe.py --config.compile_topology=v5p-32

(train step 41.29 GiB per chip of 95: room for longer rows or larger micro-batches; see docs/pod.md).
"""

from phds_jax.cli.configs import apply_arg, base_config, paper_scale


def get_config(arg=None):
  config = paper_scale(base_config())
  config.model.preset = "qwen3-30b-a3b"  # shapes only; the weights come from model_path
  config.phds.k_values = "4,5,6,7,8"
  config.eval.k_values = "1,2,4,6,8"
  # fits a v5p-32 (our choice, from the compile plan), as configs/olmoe.py fits a v5e-16
  config.train.grad_accum = 4
  config.train.remat = "full"
  config.model.expert_backend = "chunked"
  return apply_arg(config, arg)
