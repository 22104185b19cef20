"""PHDS fine-tuning of OLMoE-1B-7B-0125 (k_pre = 8) over k_train in {4..8}, anchored on k = 4.

  python -m phds_jax.main --config=configs/olmoe.py --workdir=/ckpt/olmoe_phds \
      --config.model_path=/models/OLMoE-1B-7B-0125 --config.data.train_files='/data/sft/*.jsonl'
  python -m phds_jax.main --config=configs/olmoe.py:k_values=2,4,8 ...   # another k_train set

Sized for a TPU v5e-16 slice (16 chips of 16 GiB, 4 hosts): parameters and optimizer state sharded over
all 16 chips (mesh.fsdp=-1), 64 x 2048 tokens per step as 4 micro-batches of 16 rows, every decoder layer
recomputed in the backward pass, the chunked expert backend (ragged needs 33.8 GiB per chip here). The
plan, on any machine with `pip install -e ".[tpu]"`:

  python -m phds_jax.main --config=configs/olmoe.py --config.compile_topology=v5e-16

(train step 10.85 GiB per chip of 16; see the README's "Pod scale"). Launch on the slice:

  phds-launch tpu --name olmoe --zone ZONE --accelerator v5e-16 -- --config=configs/olmoe.py \
      --config.model_path=gs://BUCKET/OLMoE-1B-7B-0125 --workdir=gs://BUCKET/olmoe_phds ...
"""

from phds_jax.cli.configs import apply_arg, base_config, paper_scale


def get_config(arg=None):
  config = paper_scale(base_config())
  config.model.preset = "olmoe-1b-7b-0125"  # shapes only; the weights come from model_path
  config.phds.k_values = "4,5,6,7,8"
  config.eval.k_values = "1,2,4,6,8"
  # fits a v5e-16 (our choice, from the compile plan): 64 rows of 2048 as 4 x 16, one row per chip
  config.train.grad_accum = 4
  config.train.remat = "full"
  config.model.expert_backend = "chunked"
  config.eval.batch_size = 16  # one validation row per chip
  return apply_arg(config, arg)
