"""Model families as plug-ins: one module per family, registered by `model_type`.

To add a family, write one module like olmoe.py (config.json both ways, tensor-name templates, presets),
import it below, and add its test variants; generic code needs no change unless the family brings a new
building block.
"""

from phds_jax.errors import ConfigError
from phds_jax.model.config import ModelConfig
from phds_jax.model.families import mixtral, olmoe, qwen2_moe, qwen3_moe  # noqa: F401  (registers them)
from phds_jax.model.families.registry import Family, HFFields, get_family, supported_model_types, all_presets

PRESETS: dict[str, ModelConfig] = all_presets()


def preset(name: str) -> ModelConfig:
  """Returns the preset called `name` (see PRESETS)."""
  try:
    return PRESETS[name]
  except KeyError:
    raise ConfigError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}") from None


__all__ = ["Family", "HFFields", "PRESETS", "get_family", "preset", "supported_model_types"]
