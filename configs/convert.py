"""Convert a checkpoint between Hugging Face format and a phds_jax orbax model checkpoint.

  python -m phds_jax.main --config=configs/convert.py --config.src=/models/OLMoE-1B-7B-0125 \
      --config.dst=/ckpt/olmoe_orbax
  python -m phds_jax.main --config=configs/convert.py:bfloat16 --config.src=/ckpt/olmoe_orbax \
      --config.dst=/models/olmoe_phds_hf

The direction is inferred from `src` (config.json: HF; model_config.json: orbax) unless `to` is set.
The optional arg sets the output dtype.
"""

import ml_collections


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.mode = "convert"
  config.src = ""  # HF model directory or phds_jax orbax checkpoint directory
  config.dst = ""  # output directory (must not exist unless overwrite)
  config.to = ""  # "hf", "orbax", or "" for the other format than src
  config.dtype = arg or ""  # "float32", "bfloat16", "float16"; "" keeps the source's dtype
  config.overwrite = False  # replace dst if it exists (atomically: the old one goes only at the end)
  config.allow_pickle = False  # accept pytorch_model.bin pickles (torch.load weights_only=True)
  config.max_shard_size_gb = 5.0  # safetensors shard size when writing HF
  return config
