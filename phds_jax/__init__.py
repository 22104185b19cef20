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

from phds_jax.cli import configs  # noqa: E402
from phds_jax import errors  # noqa: E402
from phds_jax.eval import scoring as evaluate  # noqa: E402
from phds_jax.io import hf  # noqa: E402
from phds_jax.eval import latency  # noqa: E402
from phds_jax.eval.generate import generate  # noqa: E402
from phds_jax.io.load import load  # noqa: E402
from phds_jax.model.config import ModelConfig  # noqa: E402
from phds_jax.model.families import PRESETS, preset, supported_model_types  # noqa: E402
from phds_jax.model.roe import RoE  # noqa: E402
from phds_jax.model.transformer import forward, init_params  # noqa: E402

__all__ = ["configs", "errors", "evaluate", "hf", "latency", "load", "ModelConfig", "PRESETS", "preset",
           "supported_model_types", "forward", "RoE", "generate", "init_params", "train_and_evaluate"]


def __getattr__(name):
  """`train_and_evaluate` is imported on first use: the trainer pulls in orbax and grain."""
  if name == "train_and_evaluate":
    from phds_jax.train.loop import train_and_evaluate  # pylint: disable=g-import-not-at-top
    return train_and_evaluate
  raise AttributeError(f"module 'phds_jax' has no attribute {name!r}")
