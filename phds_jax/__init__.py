"""phds_jax: one MoE checkpoint, any top-k at run time (MoE-PHDS, arXiv 2509.23012).

Public API (see README):
  cfg, params = pj.load(path, dtype="float32")   # HF directory or phds_jax orbax checkpoint
  logits = pj.forward(cfg, params, tokens, k=2)
  pj.hf.save_pretrained(cfg, params, out_dir)
  new_ids = pj.generate(cfg, params, prompts, max_new_tokens=32, k=2)
"""

from phds_jax import errors
from phds_jax import hf
from phds_jax.generate import generate
from phds_jax.load import load
from phds_jax.model.config import ModelConfig
from phds_jax.model.families import PRESETS, preset, supported_model_types
from phds_jax.model.transformer import forward, init_params

__all__ = ["errors", "hf", "load", "ModelConfig", "PRESETS", "preset", "supported_model_types", "forward",
           "generate", "init_params"]
