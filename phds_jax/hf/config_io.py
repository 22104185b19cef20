"""config.json <-> ModelConfig for the two supported families (`olmoe`, `qwen2_moe`).

Missing optional fields take transformers' defaults for the family; malformed files, wrong types and
options this implementation does not compute (sliding windows, scaled RoPE, non-SiLU experts) raise.
"""

from __future__ import annotations

import json
import os
from typing import Any

from phds_jax.errors import ConfigError, UnsupportedModelError
from phds_jax.model.config import ModelConfig

SUPPORTED_MODEL_TYPES = ("olmoe", "qwen2_moe")
ARCHITECTURES = {"olmoe": "OlmoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}

# transformers' defaults for the fields a config.json may omit.
_DEFAULTS = {
    "olmoe": dict(vocab_size=50304, hidden_size=2048, intermediate_size=2048, num_hidden_layers=16,
                  num_attention_heads=16, hidden_act="silu", max_position_embeddings=4096,
                  initializer_range=0.02, rms_norm_eps=1e-5, pad_token_id=1, bos_token_id=None,
                  eos_token_id=50279, tie_word_embeddings=False, rope_theta=10000.0,
                  attention_bias=False, clip_qkv=None, num_experts_per_tok=8, num_experts=64,
                  router_aux_loss_coef=0.01, norm_topk_prob=False),
    "qwen2_moe": dict(vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                      num_attention_heads=16, num_key_value_heads=16, hidden_act="silu",
                      max_position_embeddings=32768, initializer_range=0.02, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, rope_theta=10000.0, use_sliding_window=False,
                      decoder_sparse_step=1, moe_intermediate_size=1408,
                      shared_expert_intermediate_size=5632, num_experts_per_tok=4, num_experts=60,
                      norm_topk_prob=False, router_aux_loss_coef=0.001, mlp_only_layers=[],
                      qkv_bias=True, pad_token_id=None, bos_token_id=None, eos_token_id=None),
}


def read_config_json(path: str) -> dict[str, Any]:
  """Parses `path` (a config.json) into a dict, or raises ConfigError naming the file."""
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
  except FileNotFoundError:
    raise ConfigError(f"{path}: no config.json; is this a Hugging Face model directory?") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConfigError(f"{path}: malformed JSON ({e})") from None
  if not isinstance(raw, dict):
    raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
  return raw


class _Fields:
  """Typed access to config.json fields with family defaults; errors name the file and field."""

  def __init__(self, raw: dict[str, Any], defaults: dict[str, Any], source: str):
    self.raw, self.defaults, self.source = raw, defaults, source

  def get(self, name: str, kinds: tuple[type, ...], default: Any = None, allow_none: bool = False):
    value = self.raw.get(name, self.defaults.get(name, default))
    if value is None and allow_none:
      return None
    if isinstance(value, bool) and bool not in kinds:
      raise ConfigError(f"{self.source}: field {name!r} must be {_kind_names(kinds)}, got {value!r}")
    if not isinstance(value, kinds):
      raise ConfigError(f"{self.source}: field {name!r} must be {_kind_names(kinds)}, got {value!r}")
    return value


def _kind_names(kinds):
  return " or ".join(k.__name__ for k in kinds)


def _rope_theta(f: _Fields) -> float:
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


def config_from_hf(raw: dict[str, Any], source: str = "config.json", **overrides) -> ModelConfig:
  """Builds a ModelConfig from a parsed config.json. `overrides` set non-HF fields (expert_backend)."""
  model_type = raw.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise UnsupportedModelError(f"{source}: model_type={model_type!r} is not supported; "
                                f"supported: {list(SUPPORTED_MODEL_TYPES)}")
  f = _Fields(raw, _DEFAULTS[model_type], source)
  if f.get("hidden_act", (str,)) != "silu":
    raise UnsupportedModelError(f"{source}: hidden_act={raw.get('hidden_act')!r}; only 'silu' is supported")
  heads = f.get("num_attention_heads", (int,))
  eos = f.get("eos_token_id", (int, list), allow_none=True)
  common = dict(
      model_type=model_type,
      vocab_size=f.get("vocab_size", (int,)),
      hidden_size=f.get("hidden_size", (int,)),
      num_hidden_layers=f.get("num_hidden_layers", (int,)),
      num_attention_heads=heads,
      num_key_value_heads=f.get("num_key_value_heads", (int,), allow_none=True) or heads,
      head_dim=f.get("head_dim", (int,), allow_none=True),
      num_experts=f.get("num_experts", (int,), default=raw.get("num_local_experts")),
      num_experts_per_tok=f.get("num_experts_per_tok", (int,)),
      max_position_embeddings=f.get("max_position_embeddings", (int,)),
      rms_norm_eps=float(f.get("rms_norm_eps", (int, float))),
      rope_theta=_rope_theta(f),
      norm_topk_prob=f.get("norm_topk_prob", (bool,)),
      tie_word_embeddings=f.get("tie_word_embeddings", (bool,)),
      router_aux_loss_coef=float(f.get("router_aux_loss_coef", (int, float))),
      initializer_range=float(f.get("initializer_range", (int, float))),
      pad_token_id=f.get("pad_token_id", (int,), allow_none=True),
      bos_token_id=f.get("bos_token_id", (int,), allow_none=True),
      eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
  )
  if model_type == "olmoe":
    bias = f.get("attention_bias", (bool,))
    clip = f.get("clip_qkv", (int, float), allow_none=True)
    family = dict(moe_intermediate_size=f.get("intermediate_size", (int,)),
                  intermediate_size=f.get("intermediate_size", (int,)), qk_norm=True,
                  clip_qkv=None if clip is None else float(clip), qkv_bias=bias, o_bias=bias)
  else:
    if f.get("use_sliding_window", (bool,)):
      raise UnsupportedModelError(f"{source}: use_sliding_window=true is not supported")
    only = f.get("mlp_only_layers", (list,))
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in only):
      raise ConfigError(f"{source}: field 'mlp_only_layers' must be a list of ints, got {only!r}")
    family = dict(moe_intermediate_size=f.get("moe_intermediate_size", (int,)),
                  intermediate_size=f.get("intermediate_size", (int,)),
                  shared_expert_intermediate_size=f.get("shared_expert_intermediate_size", (int,)),
                  decoder_sparse_step=f.get("decoder_sparse_step", (int,)),
                  mlp_only_layers=tuple(only), qkv_bias=f.get("qkv_bias", (bool,)))
  try:
    return ModelConfig(**common, **family, **overrides)
  except ConfigError as e:
    raise ConfigError(f"{source}: {e}") from None


def config_to_hf(cfg: ModelConfig, dtype_name: str) -> dict[str, Any]:
  """The config.json transformers expects for `cfg`, with weights stored as `dtype_name`."""
  eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
  out = dict(
      architectures=[ARCHITECTURES[cfg.model_type]], model_type=cfg.model_type,
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
      num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
      hidden_act="silu", max_position_embeddings=cfg.max_position_embeddings,
      rms_norm_eps=cfg.rms_norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
      num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
      norm_topk_prob=cfg.norm_topk_prob, tie_word_embeddings=cfg.tie_word_embeddings,
      router_aux_loss_coef=cfg.router_aux_loss_coef, initializer_range=cfg.initializer_range,
      pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id, eos_token_id=eos,
      attention_dropout=0.0, use_cache=True, output_router_logits=False, dtype=dtype_name)
  if cfg.head_dim is not None:
    out["head_dim"] = cfg.head_dim
  if cfg.model_type == "olmoe":
    if cfg.qkv_bias != cfg.o_bias or not cfg.qk_norm or cfg.intermediate_size != cfg.moe_intermediate_size:
      raise UnsupportedModelError("this ModelConfig has no OLMoE config.json equivalent "
                                  "(OLMoE needs qk_norm, qkv_bias == o_bias, one intermediate size)")
    out.update(intermediate_size=cfg.moe_intermediate_size, attention_bias=cfg.qkv_bias,
               clip_qkv=cfg.clip_qkv)
  else:
    if cfg.qk_norm or cfg.o_bias or cfg.clip_qkv is not None or not cfg.shared_expert_intermediate_size:
      raise UnsupportedModelError("this ModelConfig has no Qwen2-MoE config.json equivalent (qwen2_moe has "
                                  "a shared expert and no qk_norm, o_bias or clip_qkv)")
    out.update(intermediate_size=cfg.intermediate_size, moe_intermediate_size=cfg.moe_intermediate_size,
               shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
               decoder_sparse_step=cfg.decoder_sparse_step, mlp_only_layers=list(cfg.mlp_only_layers),
               qkv_bias=cfg.qkv_bias, use_sliding_window=False)
  return out


def load_config(model_dir: str, **overrides) -> ModelConfig:
  """Reads `<model_dir>/config.json` into a ModelConfig."""
  path = os.path.join(model_dir, "config.json")
  return config_from_hf(read_config_json(path), source=path, **overrides)
