"""The declarative HF <-> phds_jax parameter map and its per-tensor hooks.

Each `Spec` ties one of our parameters (a path in the params pytree, with its shape) to the HF tensor
name(s) it is made of and a hook that converts between the layouts:
  - "copy":        identical layout (norm scales, biases, the embedding);
  - "linear":      ours [in, out] = HF Linear weight [out, in] transposed;
  - "experts":     ours [E, in, out] = stack over e of HF `...experts.{e}.<proj>.weight` [out, in] transposed.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from phds_jax.model.config import ModelConfig


class Spec(NamedTuple):
  path: tuple[str, ...]  # keys into our params pytree
  hf_names: tuple[str, ...]  # one name, or one per expert for "experts"
  hook: str  # "copy" | "linear" | "experts"
  shape: tuple[int, ...]  # our shape

  @property
  def hf_shape(self) -> tuple[int, ...]:
    """Shape of each HF tensor this spec reads."""
    if self.hook == "copy":
      return self.shape
    if self.hook == "linear":
      return self.shape[::-1]
    return self.shape[:0:-1]  # experts: [E, in, out] -> per-expert [out, in]


def _linear(path, hf, fan_in, fan_out):
  return Spec(path, (hf,), "linear", (fan_in, fan_out))


def _copy(path, hf, *shape):
  return Spec(path, (hf,), "copy", tuple(shape))


def _mlp_specs(ours, hf, hidden, width):
  return [_linear((*ours, "gate_proj", "kernel"), f"{hf}.gate_proj.weight", hidden, width),
          _linear((*ours, "up_proj", "kernel"), f"{hf}.up_proj.weight", hidden, width),
          _linear((*ours, "down_proj", "kernel"), f"{hf}.down_proj.weight", width, hidden)]


def _attention_specs(cfg: ModelConfig, ours, hf):
  h, d = cfg.hidden_size, cfg.resolved_head_dim
  widths = {"q": cfg.num_attention_heads * d, "k": cfg.num_key_value_heads * d,
            "v": cfg.num_key_value_heads * d}
  specs = []
  for name, width in widths.items():
    specs.append(_linear((*ours, f"{name}_proj", "kernel"), f"{hf}.{name}_proj.weight", h, width))
    if cfg.qkv_bias:
      specs.append(_copy((*ours, f"{name}_proj", "bias"), f"{hf}.{name}_proj.bias", width))
  specs.append(_linear((*ours, "o_proj", "kernel"), f"{hf}.o_proj.weight", widths["q"], h))
  if cfg.o_bias:
    specs.append(_copy((*ours, "o_proj", "bias"), f"{hf}.o_proj.bias", h))
  if cfg.qk_norm:
    specs.append(_copy((*ours, "q_norm", "scale"), f"{hf}.q_norm.weight", widths["q"]))
    specs.append(_copy((*ours, "k_norm", "scale"), f"{hf}.k_norm.weight", widths["k"]))
  return specs


def _moe_specs(cfg: ModelConfig, ours, hf):
  h, e, i = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
  specs = [_linear((*ours, "gate", "kernel"), f"{hf}.gate.weight", h, e)]
  for proj, shape in (("gate_proj", (e, h, i)), ("up_proj", (e, h, i)), ("down_proj", (e, i, h))):
    names = tuple(f"{hf}.experts.{j}.{proj}.weight" for j in range(e))
    specs.append(Spec((*ours, "experts", proj), names, "experts", shape))
  if cfg.shared_expert_intermediate_size:
    specs += _mlp_specs((*ours, "shared_expert"), f"{hf}.shared_expert", h,
                        cfg.shared_expert_intermediate_size)
    specs.append(_linear((*ours, "shared_expert_gate", "kernel"), f"{hf}.shared_expert_gate.weight", h, 1))
  return specs


def param_specs(cfg: ModelConfig) -> list[Spec]:
  """Every parameter of `cfg`'s model, in HF checkpoint order."""
  h = cfg.hidden_size
  specs = [_copy(("embed_tokens", "embedding"), "model.embed_tokens.weight", cfg.vocab_size, h)]
  for layer in range(cfg.num_hidden_layers):
    ours, hf = (f"layers_{layer}",), f"model.layers.{layer}"
    specs.append(_copy((*ours, "input_layernorm", "scale"), f"{hf}.input_layernorm.weight", h))
    specs += _attention_specs(cfg, (*ours, "self_attn"), f"{hf}.self_attn")
    specs.append(_copy((*ours, "post_attention_layernorm", "scale"),
                       f"{hf}.post_attention_layernorm.weight", h))
    if cfg.is_moe_layer(layer):
      specs += _moe_specs(cfg, (*ours, "mlp"), f"{hf}.mlp")
    else:
      specs += _mlp_specs((*ours, "mlp"), f"{hf}.mlp", h, cfg.intermediate_size)
  specs.append(_copy(("norm", "scale"), "model.norm.weight", h))
  if not cfg.tie_word_embeddings:
    specs.append(_linear(("lm_head", "kernel"), "lm_head.weight", h, cfg.vocab_size))
  return specs


def is_ignorable(name: str, cfg: ModelConfig) -> bool:
  """HF tensors that carry nothing we need: RoPE buffers, and lm_head when embeddings are tied."""
  return name.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and name == "lm_head.weight")


def to_ours(spec: Spec, read: Callable[[str], np.ndarray], out: np.ndarray) -> None:
  """Fills `out` (our layout, target dtype) from the HF tensor(s) of `spec`, read one at a time."""
  if spec.hook == "copy":
    out[...] = read(spec.hf_names[0])
  elif spec.hook == "linear":
    out[...] = read(spec.hf_names[0]).T
  else:
    for j, name in enumerate(spec.hf_names):
      out[j] = read(name).T


def to_hf(spec: Spec, ours: np.ndarray, index: int) -> np.ndarray:
  """The HF tensor number `index` of `spec` (the expert index for "experts") from our array."""
  if spec.hook == "copy":
    return ours
  if spec.hook == "linear":
    return ours.T
  return ours[index].T
