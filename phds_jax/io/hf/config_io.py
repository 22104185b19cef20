"""config.json <-> ModelConfig, generic over the registered families (phds_jax.model.families).

The fields every family shares are read here; the family's `from_hf` / `to_hf` handle the rest. Missing
optional fields take transformers' defaults for the family; malformed files, wrong types and options this
implementation does not compute (sliding windows, scaled RoPE, non-SiLU experts) raise.
"""

from __future__ import annotations

import json
import os
from typing import Any

from phds_jax.errors import ConfigError, UnsupportedModelError
from phds_jax.io import files
from phds_jax.model.config import ModelConfig
from phds_jax.model.families import HFFields, get_family


def read_config_json(path: str) -> dict[str, Any]:
  """Parses `path` (a config.json) into a dict, or raises ConfigError naming the file."""
  try:
    raw = json.loads(files.read_text(path))
  except FileNotFoundError:
    raise ConfigError(f"{path}: no config.json; is this a Hugging Face model directory?") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConfigError(f"{path}: malformed JSON ({e})") from None
  if not isinstance(raw, dict):
    raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
  return raw


def _rope_theta(f: HFFields) -> float:
  """Reads rope_parameters (transformers >= 5) or rope_theta/rope_scaling (older); only default RoPE."""
  params = f.raw.get("rope_parameters")
  if params is None:
    scaling = f.raw.get("rope_scaling")
    if scaling not in (None, {}) and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
      raise UnsupportedModelError(f"{f.source}: rope_scaling={scaling} is not supported (default RoPE only)")
    return float(f.get("rope_theta", (int, float)))
  if not isinstance(params, dict):
    raise ConfigError(f"{f.source}: field 'rope_parameters' must be an object, got {params!r}")
  if params.get("rope_type", "default") != "default":
    raise UnsupportedModelError(f"{f.source}: rope_type={params.get('rope_type')!r} is not supported "
                                "(default RoPE only)")
  theta = params.get("rope_theta", f.raw.get("rope_theta", f.defaults["rope_theta"]))
  if isinstance(theta, bool) or not isinstance(theta, (int, float)):
    raise ConfigError(f"{f.source}: rope_parameters.rope_theta must be a number, got {theta!r}")
  return float(theta)


def config_from_hf(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
  """Builds a ModelConfig from a parsed config.json of any registered family."""
  family = get_family(raw.get("model_type"), source)
  f = HFFields(raw, family.hf_defaults, source)
  if f.get("hidden_act", (str,)) != "silu":
    raise UnsupportedModelError(f"{source}: hidden_act={raw.get('hidden_act')!r}; only 'silu' is supported")
  heads = f.get("num_attention_heads", (int,))
  eos = f.get("eos_token_id", (int, list), allow_none=True)
  common = dict(
      model_type=family.model_type,
      vocab_size=f.get("vocab_size", (int,)),
      hidden_size=f.get("hidden_size", (int,)),
      num_hidden_layers=f.get("num_hidden_layers", (int,)),
      num_attention_heads=heads,
      num_key_value_heads=f.get("num_key_value_heads", (int,), allow_none=True) or heads,
      head_dim=f.get("head_dim", (int,), allow_none=True),
      num_experts_per_tok=f.get("num_experts_per_tok", (int,)),
      max_position_embeddings=f.get("max_position_embeddings", (int,)),
      rms_norm_eps=float(f.get("rms_norm_eps", (int, float))),
      rope_theta=_rope_theta(f),
      tie_word_embeddings=f.get("tie_word_embeddings", (bool,)),
      router_aux_loss_coef=float(f.get("router_aux_loss_coef", (int, float))),
      initializer_range=float(f.get("initializer_range", (int, float))),
      pad_token_id=f.get("pad_token_id", (int,), allow_none=True),
      bos_token_id=f.get("bos_token_id", (int,), allow_none=True),
      eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
  )
  specific = family.from_hf(f)
  try:
    return ModelConfig(**common, **specific)
  except ConfigError as e:
    raise ConfigError(f"{source}: {e}") from None


def config_to_hf(cfg: ModelConfig, dtype_name: str) -> dict[str, Any]:
  """The config.json transformers expects for `cfg`, with weights stored as `dtype_name`."""
  family = get_family(cfg.model_type)
  try:
    specific = family.to_hf(cfg)
  except ValueError as e:
    raise UnsupportedModelError(f"this ModelConfig has no {family.architecture} config.json equivalent: "
                                f"{e}") from None
  eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
  out = dict(
      architectures=[family.architecture], model_type=cfg.model_type,
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
      num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
      hidden_act="silu", max_position_embeddings=cfg.max_position_embeddings,
      rms_norm_eps=cfg.rms_norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
      num_experts_per_tok=cfg.num_experts_per_tok, tie_word_embeddings=cfg.tie_word_embeddings,
      router_aux_loss_coef=cfg.router_aux_loss_coef, initializer_range=cfg.initializer_range,
      pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id, eos_token_id=eos,
      attention_dropout=0.0, use_cache=True, output_router_logits=False, dtype=dtype_name, **specific)
  if cfg.head_dim is not None:
    out["head_dim"] = cfg.head_dim
  return out


def load_config(model_dir: str) -> ModelConfig:
  """Reads `<model_dir>/config.json` into a ModelConfig."""
  path = os.path.join(model_dir, "config.json")
  return config_from_hf(read_config_json(path), source=path)
