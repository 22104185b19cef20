"""PHDS fine-tuning of Qwen1.5-MoE-A2.7B (k_pre = 4) over k_train in {1..4}, anchored on k = 1.

  python -m phds_jax.main --config=configs/qwen_moe.py --workdir=/ckpt/qwen_phds \
      --config.model_path=/models/Qwen1.5-MoE-A2.7B --config.data.train_files='/data/sft/*.jsonl'
  python -m phds_jax.main --config=configs/qwen_moe.py:k_values=2,4 ...

Meant for a TPU v5e-32 slice (32 chips of 16 GiB, 8 hosts): parameters and optimizer state sharded over
all 32 chips (mesh.fsdp=-1), 64 x 2048 tokens per step as 2 micro-batches of 32 rows, every decoder layer
recomputed in the backward pass, the chunked expert backend. The plan, on any machine with
`pip install -e ".[tpu]"`:

  python -m phds_jax.main --config=configs/qwen_moe.py --config.compile_topology=v5e-32

The plan (README, "Pod scale") puts the train step at 15.05 GiB per chip of 16, validation at 9.47 and
generation at 3.03. The margin is thin: a longer data.seq_len or a larger batch needs a new plan. Compiling
it takes ~26 minutes and ~22 GB of host memory on a CPU machine. Launch on the slice:

  phds-launch tpu --name qwen --zone ZONE --accelerator v5e-32 -- --config=configs/qwen_moe.py \
      --config.model_path=gs://BUCKET/Qwen1.5-MoE-A2.7B --workdir=gs://BUCKET/qwen_phds ...
"""

from phds_jax.cli.configs import apply_arg, base_config, paper_scale


def get_config(arg=None):
  config = paper_scale(base_config())
  config.model.preset = "qwen1.5-moe-a2.7b"  # shapes only; the weights come from model_path
  config.phds.k_values = "1,2,3,4"
  config.eval.k_values = "1,2,3,4"
  # sized for a v5e-32 (the plan: 15.05 GiB per chip): 64 rows of 2048 as 2 micro-batches of 32, one row per chip
  config.train.grad_accum = 2
  config.train.remat = "full"
  config.model.expert_backend = "chunked"
  config.eval.batch_size = 32  # one validation row per chip
  return apply_arg(config, arg)
