"""Prepare SFT (or LM) data once: tokenized in parallel, packed into rows and written as shards that
training, evaluation and the study stream (docs/data.md, "Prepared data").

  python -m phds_jax.main --config=configs/prepare.py:olmoe --config.model_path=/models/OLMoE-1B-7B-0125 \
      --config.data.train_files='/data/sft/*.jsonl' --config.data.prepared=gs://BUCKET/sft_olmoe
  python -m phds_jax.main --config=configs/olmoe.py --config.model_path=... \
      --config.data.prepared=gs://BUCKET/sft_olmoe                          # then train from it

The argument names the run config the data is for (configs/<name>.py): its data.seq_len,
data.max_loss_tokens and data.format are used, so the run accepts the result; without one, the base
config's. Only the tokenizer of tokenizer_path (else model_path) is read. Several data.train_files sources
(comma-separated) are kept apart, so a run can weigh them with data.mixture. An interrupted prepare
continues where it stopped when run again; data.workers processes tokenize (0 = one per core).
"""

import importlib.util
import os

from phds_jax.cli.configs import apply_arg, base_config


def get_config(arg=None):
  name, _, rest = (arg or "").partition(";") if arg and "=" not in arg.split(";")[0] else ("", "", arg or "")
  if name:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    if not os.path.isfile(path):
      raise ValueError(f"configs/prepare.py:{name}: no configs/{name}.py to prepare data for")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
  else:
    config = base_config()
  config.mode = "prepare"
  config.workdir = ""  # the output is data.prepared
  return apply_arg(config, rest)
