"""phds_jax: one MoE checkpoint, any top-k at run time (MoE-PHDS, arXiv 2509.23012).

Public API (see README):
  cfg, params = pj.hf.load_pretrained(path, dtype="float32")
  logits = pj.forward(cfg, params, tokens, k=2)
  pj.hf.save_pretrained(cfg, params, out_dir)
  new_ids = pj.generate(cfg, params, prompts, max_new_tokens=32, k=2)
"""

from phds_jax import errors
from phds_jax import hf
from phds_jax.model.config import ModelConfig, PRESETS, preset
from phds_jax.generate import generate
from phds_jax.model.transformer import forward, init_params

__all__ = ["errors", "hf", "ModelConfig", "PRESETS", "preset", "forward", "generate", "init_params"]
