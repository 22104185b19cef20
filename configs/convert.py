"""Convert a checkpoint between Hugging Face format and a phds_jax orbax model checkpoint.

  python -m phds_jax.main --config=configs/convert.py --config.model_path=/models/OLMoE-1B-7B-0125 \
      --config.convert.dst=/ckpt/olmoe_orbax
  python -m phds_jax.main --config=configs/convert.py:bfloat16 --config.model_path=/ckpt/olmoe_orbax \
      --config.convert.dst=/models/olmoe_phds_hf

The direction is inferred from `model_path` (config.json: HF; model_config.json: orbax) unless
`convert.to` is set. The optional arg sets the output dtype (model.param_dtype; "" keeps the source's).
Fields: phds_jax/cli/configs.py (the `convert` block).
"""

from phds_jax.cli.configs import base_config


def get_config(arg=None):
  config = base_config()
  config.mode = "convert"
  config.model.param_dtype = arg or ""
  return config
