"""The family plug-in contract and its registry, keyed by config.json's `model_type`.

A family module (olmoe.py, qwen2_moe.py, ...) builds one `Family` and registers it. It holds everything
specific to that family: how config.json maps to ModelConfig both ways, the Hugging Face tensor-name
template of each neutral parameter role (model/layout.py), and its presets. Generic code (hf/, sharding,
the trainer) only ever asks the registry.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from phds_jax.errors import ConfigError, UnsupportedModelError
from phds_jax.model.config import ModelConfig

# Tensor names shared by the Llama-style decoders; a family copies and edits what differs.
LLAMA_STYLE_NAMES = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "input_norm": "model.layers.{layer}.input_layernorm.weight",
    "post_attn_norm": "model.layers.{layer}.post_attention_layernorm.weight",
    **{f"attn.{p}": f"model.layers.{{layer}}.self_attn.{p}_proj.weight" for p in "qkvo"},
    **{f"attn.{p}_bias": f"model.layers.{{layer}}.self_attn.{p}_proj.bias" for p in "qkvo"},
    "attn.q_norm": "model.layers.{layer}.self_attn.q_norm.weight",
    "attn.k_norm": "model.layers.{layer}.self_attn.k_norm.weight",
    **{f"mlp.{p}": f"model.layers.{{layer}}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
    "moe.router": "model.layers.{layer}.mlp.gate.weight",
    **{f"moe.experts.{p}": f"model.layers.{{layer}}.mlp.experts.{{expert}}.{p}_proj.weight"
       for p in ("gate", "up", "down")},
    **{f"moe.shared.{p}": f"model.layers.{{layer}}.mlp.shared_expert.{p}_proj.weight" for p in ("gate", "up", "down")},
    "moe.shared_gate": "model.layers.{layer}.mlp.shared_expert_gate.weight",
}


class HFFields:
  """Typed access to config.json fields with the family's defaults; errors name the file and field."""

  def __init__(self, raw: dict[str, Any], defaults: dict[str, Any], source: str):
    self.raw, self.defaults, self.source = raw, defaults, source

  def get(self, name: str, kinds: tuple[type, ...], default: Any = None, allow_none: bool = False):
    value = self.raw.get(name, self.defaults.get(name, default))
    if value is None and allow_none:
      return None
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
      names = " or ".join(k.__name__ for k in kinds)
      raise ConfigError(f"{self.source}: field {name!r} must be {names}, got {value!r}")
    return value

  def get_aliased(self, names: tuple[str, ...], kinds: tuple[type, ...]):
    """The first of `names` that config.json holds (several spellings of one field), else its default."""
    present = [n for n in names if n in self.raw]
    return self.get(present[0] if present else names[0], kinds)

  def int_list(self, name: str) -> tuple[int, ...]:
    value = self.get(name, (list,), allow_none=True) or []
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
      raise ConfigError(f"{self.source}: field {name!r} must be a list of ints, got {value!r}")
    return tuple(value)

  def refuse(self, message: str):
    raise UnsupportedModelError(f"{self.source}: {message}")


@dataclasses.dataclass(frozen=True)
class Family:
  """One model family. `from_hf` returns the family-specific ModelConfig fields; `to_hf` the
  family-specific config.json entries (raising UnsupportedModelError if `cfg` has no equivalent)."""

  model_type: str
  architecture: str  # transformers class in config.json's "architectures"
  hf_defaults: dict[str, Any]  # transformers' defaults for fields config.json may omit
  from_hf: Callable[[HFFields], dict[str, Any]]
  to_hf: Callable[[ModelConfig], dict[str, Any]]
  tensor_names: dict[str, str]  # neutral role -> HF name template ({layer}, {expert})
  presets: dict[str, ModelConfig] = dataclasses.field(default_factory=dict)

  def tensor_name(self, role: str, layer: Optional[int] = None, expert: Optional[int] = None) -> str:
    try:
      template = self.tensor_names[role]
    except KeyError:
      raise UnsupportedModelError(f"{self.model_type} checkpoints have no tensor for parameter role "
                                  f"{role!r}") from None
    return template.format(layer=layer, expert=expert)


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
  if family.model_type in _REGISTRY:
    raise ValueError(f"model family {family.model_type!r} is registered twice")
  _REGISTRY[family.model_type] = family
  return family


def supported_model_types() -> list[str]:
  return sorted(_REGISTRY)


def get_family(model_type: Any, source: str = "model config") -> Family:
  """The registered family of `model_type`, or UnsupportedModelError listing the supported ones."""
  if model_type not in _REGISTRY:
    raise UnsupportedModelError(f"{source}: model_type={model_type!r} is not supported; "
                                f"supported: {supported_model_types()}")
  return _REGISTRY[model_type]


def all_presets() -> dict[str, ModelConfig]:
  return {name: cfg for family in _REGISTRY.values() for name, cfg in family.presets.items()}
