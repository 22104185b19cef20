"""Every parameter of a model, described once: path, logical axes, neutral role, trainable group; its shape
is read from the Flax modules themselves (`jax.eval_shape` of `init_params`: nothing is allocated), so
shapes are declared in one place, the modules.

`param_layout(cfg)` lists the parameters `init_params(cfg)` creates. Decoder layers are stored stacked: each
run of equal layers (`cfg.layer_runs`: all of them for most models, "layers") holds every parameter of its
layers on a leading "layers" axis, so one `jax.lax.scan` computes the run. Generic code works from the
layout instead of matching parameter names:
  - sharding maps `axes` (logical names such as "embed", "exp") to mesh axes (sharding.py);
  - trainable subsets select by `groups` ("attention", "experts", "router", ...);
  - Hugging Face conversion looks up the family's tensor-name template for `role` (model/families/).
Roles are family-neutral: "attn.q" is the query projection kernel in every family, whatever the
checkpoint calls it.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, NamedTuple, Optional

import jax

from phds_jax.model import sharding
from phds_jax.model.config import ModelConfig

# Trainable groups (train.trainable); "all" selects everything.
GROUPS = ("attention", "experts", "router", "shared_expert", "dense_mlp", "embeddings", "norms")


class ParamSpec(NamedTuple):
  path: tuple[str, ...]  # keys into the params pytree
  shape: tuple[int, ...]
  axes: tuple[Optional[str], ...]  # one logical axis name per dimension (None: never sharded)
  role: str  # family-neutral name, e.g. "attn.q", "moe.experts.gate", "final_norm"
  kind: str  # one layer's layout against HF: "copy" (same), "linear" ([in, out] vs [out, in]), "experts"
  layers: tuple[int, ...]  # the decoder layers stacked on its first axis; () for embeddings, final norm, head
  groups: frozenset[str]  # trainable groups this parameter belongs to

  @property
  def layer_shape(self) -> tuple[int, ...]:
    """The shape of one layer's slice (the whole shape when not stacked)."""
    return self.shape[1:] if self.layers else self.shape

  @property
  def hf_shape(self) -> tuple[int, ...]:
    """Shape of each HF tensor this parameter is made of (one per layer, and per expert for "experts")."""
    if self.kind == "copy":
      return self.layer_shape
    if self.kind == "linear":
      return self.layer_shape[::-1]
    return self.layer_shape[:0:-1]

  @property
  def name(self) -> str:
    return "/".join(self.path)


@functools.lru_cache(maxsize=32)
def _shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """path -> shape of every parameter the Flax modules create for `cfg` (abstract: no memory, no compile)."""
  from phds_jax.model.transformer import init_params  # pylint: disable=g-import-not-at-top

  tree = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  return {sharding.path_keys(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


class _Specs:
  """Builds one model's ParamSpecs, each shape looked up in the modules' own (`_shapes`); a stacked
  parameter (`layers` not empty) gets the "layers" logical axis first."""

  def __init__(self, cfg: ModelConfig):
    self.cfg, self.shapes = cfg, _shapes(cfg)

  def __call__(self, path, axes, role, kind, layers, *groups) -> ParamSpec:
    path = tuple(path)
    if path not in self.shapes:
      raise ValueError(f"{'/'.join(path)}: the layout names a parameter the {self.cfg.model_type} modules do not "
                       "create")
    axes = ("layers", *axes) if layers else tuple(axes)
    return ParamSpec(path, self.shapes[path], axes, role, kind, tuple(layers), frozenset(groups))

  def mlp(self, prefix, role, layers, group) -> list[ParamSpec]:
    return [self((*prefix, "gate_proj", "kernel"), ("embed", "mlp"), f"{role}.gate", "linear", layers, group),
            self((*prefix, "up_proj", "kernel"), ("embed", "mlp"), f"{role}.up", "linear", layers, group),
            self((*prefix, "down_proj", "kernel"), ("mlp", "embed"), f"{role}.down", "linear", layers, group)]

  def attention(self, prefix, layers) -> list[ParamSpec]:
    cfg, out = self.cfg, []
    for name in ("q", "k", "v"):
      out.append(self((*prefix, f"{name}_proj", "kernel"), ("embed", "heads"), f"attn.{name}", "linear", layers,
                      "attention"))
      if cfg.qkv_bias:
        out.append(self((*prefix, f"{name}_proj", "bias"), ("heads",), f"attn.{name}_bias", "copy", layers,
                        "attention"))
    out.append(self((*prefix, "o_proj", "kernel"), ("heads", "embed"), "attn.o", "linear", layers, "attention"))
    if cfg.o_bias:
      out.append(self((*prefix, "o_proj", "bias"), ("norm",), "attn.o_bias", "copy", layers, "attention"))
    if cfg.qk_norm != "none":
      for name in ("q", "k"):
        out.append(self((*prefix, f"{name}_norm", "scale"), ("norm",), f"attn.{name}_norm", "copy", layers,
                        "attention", "norms"))
    return out

  def moe(self, prefix, layers) -> list[ParamSpec]:
    out = [self((*prefix, "gate", "kernel"), ("embed", "router"), "moe.router", "linear", layers, "router")]
    for proj, axes in (("gate", ("exp", "embed", "mlp")), ("up", ("exp", "embed", "mlp")),
                       ("down", ("exp", "mlp", "embed"))):
      out.append(self((*prefix, "experts", f"{proj}_proj"), axes, f"moe.experts.{proj}", "experts", layers,
                      "experts"))
    if self.cfg.shared_expert_intermediate_size:
      out += self.mlp((*prefix, "shared_expert"), "moe.shared", layers, "shared_expert")
      out.append(self((*prefix, "shared_expert_gate", "kernel"), ("embed", "router"), "moe.shared_gate", "linear",
                      layers, "shared_expert"))
    return out


def param_layout(cfg: ModelConfig) -> list[ParamSpec]:
  """Every parameter of `cfg`'s model: embeddings, each run of stacked layers, final norm, head."""
  spec = _Specs(cfg)
  specs = [spec(("embed_tokens", "embedding"), ("vocab", "embed"), "embed", "copy", (), "embeddings")]
  for run in cfg.layer_runs:
    prefix, layers = (run.name,), tuple(range(run.start, run.stop))
    specs.append(spec((*prefix, "input_layernorm", "scale"), ("norm",), "input_norm", "copy", layers, "norms"))
    specs += spec.attention((*prefix, "self_attn"), layers)
    specs.append(spec((*prefix, "post_attention_layernorm", "scale"), ("norm",), "post_attn_norm", "copy", layers,
                      "norms"))
    if run.is_moe:
      specs += spec.moe((*prefix, "mlp"), layers)
    else:
      specs += spec.mlp((*prefix, "mlp"), "mlp", layers, "dense_mlp")
  specs.append(spec(("norm", "scale"), ("norm",), "final_norm", "copy", (), "norms"))
  if not cfg.tie_word_embeddings:
    specs.append(spec(("lm_head", "kernel"), ("embed", "vocab"), "lm_head", "linear", (), "embeddings"))
  if len(specs) != len(spec.shapes):
    missing = sorted(set(spec.shapes) - {s.path for s in specs})
    raise ValueError(f"the {cfg.model_type} modules create parameters the layout does not name: {missing[:4]}")
  return specs


def axes_by_path(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[Optional[str], ...]]:
  """Parameter path -> logical axes, for sharding rules."""
  return {spec.path: spec.axes for spec in param_layout(cfg)}


def parse_trainable(spec: str) -> list[str]:
  """The entries of a `train.trainable` spec (comma-separated "all", GROUPS names or "re:<regex>" over
  "/"-joined parameter paths); ValueError naming the first bad entry. The one parser of the field."""
  entries = [e.strip() for e in spec.split(",") if e.strip()]
  if not entries:
    raise ValueError(f"train.trainable={spec!r}: empty; use all, {', '.join(GROUPS)} or re:<regex>")
  for entry in entries:
    if entry.startswith("re:"):
      try:
        re.compile(entry[3:])
      except re.error as e:
        raise ValueError(f"train.trainable: bad regex {entry[3:]!r} ({e})") from None
    elif entry != "all" and entry not in GROUPS:
      raise ValueError(f"train.trainable={spec!r}: unknown subset {entry!r}; use all, {', '.join(GROUPS)} or "
                       "re:<regex>")
  return entries


def trainable_paths(cfg: ModelConfig, spec: str) -> set[str]:
  """The "/"-joined parameter paths of `cfg` that `spec` selects (ValueError when it selects none)."""
  groups = {s.name: s.groups for s in param_layout(cfg)}
  selected: set[str] = set()
  for entry in parse_trainable(spec):
    if entry.startswith("re:"):
      selected |= {p for p in groups if re.search(entry[3:], p)}
    elif entry == "all":
      selected |= set(groups)
    else:
      selected |= {p for p, g in groups.items() if entry in g}
  if not selected:
    raise ValueError(f"train.trainable={spec!r} selects no parameter of the {cfg.model_type} model")
  return selected


def layout_sharding(mesh, cfg: ModelConfig) -> Callable[[tuple[str, ...], tuple[int, ...]], Any]:
  """(param path, shape) -> NamedSharding by the parameter's logical axes in `cfg`'s layout under the
  rules current now (the form `pj.load(..., sharding=)` takes); a path the layout does not know is an error."""
  axes, rules = axes_by_path(cfg), sharding.current_rules()

  def one(path, shape):
    if tuple(path) not in axes:
      raise ValueError(f"{'/'.join(path)} is no parameter of the {cfg.model_type} layout")
    return jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(dict(mesh.shape), axes[tuple(path)], shape, rules))

  return one
