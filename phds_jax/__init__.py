"""phds_jax: one MoE checkpoint, any top-k at run time (MoE-PHDS, arXiv 2509.23012).

Public API (see README):
  cfg, params = pj.load(path, dtype="float32")   # HF directory or phds_jax orbax checkpoint
  logits = pj.forward(cfg, params, tokens, k=2)
  logp = pj.forward(cfg, params, tokens, k=2, roe=pj.RoE(members=4, tau=0.5))  # ensemble of routings
  pj.hf.save_pretrained(cfg, params, out_dir)
  new_ids = pj.generate(cfg, params, prompts, max_new_tokens=32, k=2)
  pj.evaluate.multiple_choice(cfg, params, tokenizer, items, k=2)   # accuracy, predictions per item
  pj.latency.measure(cfg, params, k=2)                               # prefill tok/s, decode ms/token
  config = pj.configs.base_config(); summary = pj.train_and_evaluate(config, workdir)   # PHDS fine-tune
"""

from phds_jax import platforms

platforms.use_cpu_without_accelerator()  # before jax starts: no libtpu probe where no accelerator is visible

import importlib
from typing import TYPE_CHECKING

# public name -> (module, attribute; None: the module itself). Imported on first use, so that a command
# that stops at a user's mistake (`python -m phds_jax.main --config=configs/nope.py`) or prints its help
# does not first import JAX, orbax and grain (1.4 s on a 2-core machine, for nothing).
_PUBLIC = {
    "configs": ("phds_jax.cli.configs", None),
    "errors": ("phds_jax.errors", None),
    "evaluate": ("phds_jax.eval.scoring", None),
    "hf": ("phds_jax.io.hf", None),
    "latency": ("phds_jax.eval.latency", None),
    "generate": ("phds_jax.eval.generate", "generate"),
    "load": ("phds_jax.io.load", "load"),
    "ModelConfig": ("phds_jax.model.config", "ModelConfig"),
    "PRESETS": ("phds_jax.model.families", "PRESETS"),
    "preset": ("phds_jax.model.families", "preset"),
    "supported_model_types": ("phds_jax.model.families", "supported_model_types"),
    "RoE": ("phds_jax.model.roe", "RoE"),
    "forward": ("phds_jax.model.transformer", "forward"),
    "init_params": ("phds_jax.model.transformer", "init_params"),
    "train_and_evaluate": ("phds_jax.train.loop", "train_and_evaluate"),
}
__all__ = list(_PUBLIC)

if TYPE_CHECKING:  # what the names are, for type checkers and editors ("x as x": re-exported)
  from phds_jax import errors as errors
  from phds_jax.cli import configs as configs
  from phds_jax.eval import latency as latency
  from phds_jax.eval import scoring as evaluate  # noqa: F401
  from phds_jax.eval.generate import generate as generate
  from phds_jax.io import hf as hf
  from phds_jax.io.load import load as load
  from phds_jax.model.config import ModelConfig as ModelConfig
  from phds_jax.model.families import PRESETS as PRESETS, preset as preset
  from phds_jax.model.families import supported_model_types as supported_model_types
  from phds_jax.model.roe import RoE as RoE
  from phds_jax.model.transformer import forward as forward, init_params as init_params
  from phds_jax.train.loop import train_and_evaluate as train_and_evaluate


def __getattr__(name):
  if name not in _PUBLIC:
    raise AttributeError(f"module 'phds_jax' has no attribute {name!r}")
  module, attribute = _PUBLIC[name]
  value = importlib.import_module(module)
  value = value if attribute is None else getattr(value, attribute)
  globals()[name] = value  # once
  return value


def __dir__():
  return sorted(set(globals()) | set(_PUBLIC))
