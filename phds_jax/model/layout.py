"""Every parameter of a model, described once: path, shape, logical axes, neutral role, trainable group.

`param_layout(cfg)` lists the parameters `init_params(cfg)` creates, in checkpoint order. Generic code
works from it instead of matching parameter names:
  - sharding maps `axes` (logical names such as "embed", "exp") to mesh axes (sharding.py);
  - trainable subsets select by `groups` ("attention", "experts", "router", ...);
  - Hugging Face conversion looks up the family's tensor-name template for `role` (model/families/).
Roles are family-neutral: "attn.q" is the query projection kernel in every family, whatever the
checkpoint calls it.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from phds_jax.model.config import ModelConfig

# Trainable groups (train.trainable); "all" selects everything.
GROUPS = ("attention", "experts", "router", "shared_expert", "dense_mlp", "embeddings", "norms")


class ParamSpec(NamedTuple):
  path: tuple[str, ...]  # keys into the params pytree
  shape: tuple[int, ...]
  axes: tuple[Optional[str], ...]  # one logical axis name per dimension (None: never sharded)
  role: str  # family-neutral name, e.g. "attn.q", "moe.experts.gate", "final_norm"
  kind: str  # layout against HF: "copy" (same), "linear" ([in, out] vs [out, in]), "experts" (stacked)
  layer: Optional[int]  # decoder layer index, None for embeddings, final norm and head
  groups: frozenset[str]  # trainable groups this parameter belongs to

  @property
  def hf_shape(self) -> tuple[int, ...]:
    """Shape of each HF tensor this parameter is made of (one per expert for "experts")."""
    if self.kind == "copy":
      return self.shape
    if self.kind == "linear":
      return self.shape[::-1]
    return self.shape[:0:-1]

  @property
  def name(self) -> str:
    return "/".join(self.path)


def _spec(path, shape, axes, role, kind, layer, *groups):
  return ParamSpec(tuple(path), tuple(shape), tuple(axes), role, kind, layer, frozenset(groups))


def _mlp(prefix, role, hidden, width, layer, group):
  return [_spec((*prefix, "gate_proj", "kernel"), (hidden, width), ("embed", "mlp"), f"{role}.gate", "linear",
                layer, group),
          _spec((*prefix, "up_proj", "kernel"), (hidden, width), ("embed", "mlp"), f"{role}.up", "linear",
                layer, group),
          _spec((*prefix, "down_proj", "kernel"), (width, hidden), ("mlp", "embed"), f"{role}.down", "linear",
                layer, group)]


def _attention(cfg: ModelConfig, prefix, layer):
  h, d = cfg.hidden_size, cfg.resolved_head_dim
  widths = {"q": cfg.num_attention_heads * d, "k": cfg.num_key_value_heads * d, "v": cfg.num_key_value_heads * d}
  out = []
  for name, width in widths.items():
    out.append(_spec((*prefix, f"{name}_proj", "kernel"), (h, width), ("embed", "heads"), f"attn.{name}", "linear",
                     layer, "attention"))
    if cfg.qkv_bias:
      out.append(_spec((*prefix, f"{name}_proj", "bias"), (width,), ("heads",), f"attn.{name}_bias", "copy", layer,
                       "attention"))
  out.append(_spec((*prefix, "o_proj", "kernel"), (widths["q"], h), ("heads", "embed"), "attn.o", "linear", layer,
                   "attention"))
  if cfg.o_bias:
    out.append(_spec((*prefix, "o_proj", "bias"), (h,), ("norm",), "attn.o_bias", "copy", layer, "attention"))
  if cfg.qk_norm != "none":
    q_width, k_width = (widths["q"], widths["k"]) if cfg.qk_norm == "projection" else (d, d)
    out.append(_spec((*prefix, "q_norm", "scale"), (q_width,), ("norm",), "attn.q_norm", "copy", layer,
                     "attention", "norms"))
    out.append(_spec((*prefix, "k_norm", "scale"), (k_width,), ("norm",), "attn.k_norm", "copy", layer,
                     "attention", "norms"))
  return out


def _moe(cfg: ModelConfig, prefix, layer):
  h, e, i = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
  out = [_spec((*prefix, "gate", "kernel"), (h, e), ("embed", "router"), "moe.router", "linear", layer, "router")]
  for proj, shape, axes in (("gate", (e, h, i), ("exp", "embed", "mlp")), ("up", (e, h, i), ("exp", "embed", "mlp")),
                            ("down", (e, i, h), ("exp", "mlp", "embed"))):
    out.append(_spec((*prefix, "experts", f"{proj}_proj"), shape, axes, f"moe.experts.{proj}", "experts", layer,
                     "experts"))
  if cfg.shared_expert_intermediate_size:
    out += _mlp((*prefix, "shared_expert"), "moe.shared", h, cfg.shared_expert_intermediate_size, layer,
                "shared_expert")
    out.append(_spec((*prefix, "shared_expert_gate", "kernel"), (h, 1), ("embed", "router"), "moe.shared_gate",
                     "linear", layer, "shared_expert"))
  return out


def param_layout(cfg: ModelConfig) -> list[ParamSpec]:
  """Every parameter of `cfg`'s model, in Hugging Face checkpoint order."""
  h = cfg.hidden_size
  specs = [_spec(("embed_tokens", "embedding"), (cfg.vocab_size, h), ("vocab", "embed"), "embed", "copy", None,
                 "embeddings")]
  for layer in range(cfg.num_hidden_layers):
    prefix = (f"layers_{layer}",)
    specs.append(_spec((*prefix, "input_layernorm", "scale"), (h,), ("norm",), "input_norm", "copy", layer, "norms"))
    specs += _attention(cfg, (*prefix, "self_attn"), layer)
    specs.append(_spec((*prefix, "post_attention_layernorm", "scale"), (h,), ("norm",), "post_attn_norm", "copy",
                       layer, "norms"))
    if cfg.is_moe_layer(layer):
      specs += _moe(cfg, (*prefix, "mlp"), layer)
    else:
      specs += _mlp((*prefix, "mlp"), "mlp", h, cfg.intermediate_size, layer, "dense_mlp")
  specs.append(_spec(("norm", "scale"), (h,), ("norm",), "final_norm", "copy", None, "norms"))
  if not cfg.tie_word_embeddings:
    specs.append(_spec(("lm_head", "kernel"), (h, cfg.vocab_size), ("embed", "vocab"), "lm_head", "linear", None,
                       "embeddings"))
  return specs


def axes_by_path(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[Optional[str], ...]]:
  """Parameter path -> logical axes, for sharding rules."""
  return {spec.path: spec.axes for spec in param_layout(cfg)}
