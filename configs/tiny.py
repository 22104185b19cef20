"""The built-in CPU default: the dial, end to end, in a few minutes on 2 cores (nothing is fetched).

  python -m phds_jax.main --config=configs/tiny.py --workdir=/tmp/phds_tiny

Trains a small OLMoE-shaped MoE (8 experts, k_pre = 2) from random weights at k_pre on synthetic task
families in a 51-word vocabulary (phds_jax/data/synthetic.py: modular arithmetic and letter-offset facts,
pattern completion), kept in workdir/base for later runs. The base knows them at k_pre and less at k = 1.
Then fine-tunes it on fresh draws of the same families twice: PHDS (k_train in {1, 2}, soft mask,
anchoring on k = 1) and, as the control, plain SFT at k_pre; selects each by validation loss at k_pre and
prints per k the validation loss and evaluation accuracy of the base, SFT and PHDS models.
"""

import ml_collections

from phds_jax.cli.configs import apply_arg, base_config


def get_config(arg=None):
  config = base_config()
  config.mode = "builtin"
  config.workdir = "workdir/tiny"  # relative to where the command runs; overridden by --workdir
  config.model.preset = "tiny-olmoe"
  config.model.overrides.update(dict(  # ~1.8M parameters, 8 experts, k_pre = 2, the 51-word vocabulary
      vocab_size=64, hidden_size=128, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=4,
      num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, intermediate_size=128,
      max_position_embeddings=1024, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2))

  config.builtin = ml_collections.ConfigDict()
  config.builtin.cache = ""  # "" = $PHDS_CACHE or ~/.cache/phds_jax
  config.builtin.mixture = "arith:2,after:2,pattern:1"  # task families (synthetic.py) and their weights
  config.builtin.pretrain_items = 20000  # items the base is trained on (the facts of arith and after, each often)
  config.builtin.finetune_items = 4000  # fresh draws for the fine-tunes (10% of them validate)
  config.builtin.eval_items = 300  # per family: every fact of arith (300) and after (260); new pattern contexts

  config.pretrain = ml_collections.ConfigDict()
  config.pretrain.steps = 400  # base model training steps at k_pre
  config.pretrain.batch_size = 16  # packed rows per pre-training step
  config.pretrain.seq_len = 128  # positions per pre-training row
  config.pretrain.lr = 3e-3  # peak pre-training learning rate (cosine decay after warmup)
  config.pretrain.warmup_steps = 20  # linear warmup steps of pre-training

  config.data.seq_len = 128  # about 12 items per packed row
  config.data.max_loss_tokens = 32  # answer + EOS per item: logits for 32 positions per row only
  config.data.val_fraction = 0.1
  config.phds.k_values = "1,2"
  config.phds.anchor_start_frac = 0.7  # anchoring on k = 1 over the last 30% of the fine-tuning steps
  config.eval.k_values = "1,2,4"
  config.eval.every = 40
  config.eval.batch_size = 16
  config.train.steps = 160  # per fine-tune (PHDS, then the SFT control)
  config.train.batch_size = 8
  config.train.compute_dtype = "float32"
  config.optim.lr = 1e-3
  config.optim.warmup_steps = 10
  config.checkpoint.every = 40
  config.log_every = 40
  return apply_arg(config, arg)
