"""ModelConfig: one frozen description of a MoE decoder's architecture, with HF field names.

Family differences are plain fields (`qk_norm`, `qkv_bias`, `shared_expert_intermediate_size`, ...), so
the layers never branch on a model name; `model_type` only selects the family module (model/families/)
that maps config.json and tensor names. Execution choices (the expert backend, dtypes, sharding) are
arguments of loading and of `forward`, never fields here, so they are never written into a checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

from phds_jax.errors import ConfigError

QK_NORMS = ("none", "projection", "head")
# Fields of older model_config.json files that are not architecture and are dropped on reading.
_DROPPED_FIELDS = ("expert_backend",)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of a MoE decoder. Field names follow transformers' config.json where one exists."""

  model_type: str  # the family (phds_jax.model.families): decides the HF mapping, not the maths
  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  num_experts: int
  num_experts_per_tok: int  # k_pre: the top-k the checkpoint was trained at
  moe_intermediate_size: int  # hidden width of one routed expert
  intermediate_size: int = 0  # hidden width of dense MLP layers (Qwen `mlp_only_layers` / sparse step)
  head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
  max_position_embeddings: int = 4096
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  norm_topk_prob: bool = False  # renormalise the kept top-k probabilities to sum to one
  qk_norm: str = "none"  # RMSNorm of q and k: "projection" (OLMoE, whole projection), "head" (Qwen3, per head)
  clip_qkv: Optional[float] = None  # OLMoE: clamp q, k, v to [-clip_qkv, clip_qkv] (after the qk norm)
  qkv_bias: bool = False  # bias on q/k/v projections (Qwen)
  o_bias: bool = False  # bias on the output projection (OLMoE `attention_bias=True`)
  shared_expert_intermediate_size: int = 0  # Qwen: width of the always-on shared expert; 0 = none
  decoder_sparse_step: int = 1  # layer i is MoE iff (i + 1) % step == 0 and i not in mlp_only_layers
  mlp_only_layers: tuple[int, ...] = ()
  tie_word_embeddings: bool = False
  router_aux_loss_coef: float = 0.01
  initializer_range: float = 0.02
  pad_token_id: Optional[int] = None
  bos_token_id: Optional[int] = None
  eos_token_id: Optional[int | tuple[int, ...]] = None

  def __post_init__(self):
    positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                "max_position_embeddings", "decoder_sparse_step")
    for name in positive:
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"ModelConfig.{name} must be a positive int, got {value!r}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ConfigError(
          f"num_attention_heads={self.num_attention_heads} is not a multiple of "
          f"num_key_value_heads={self.num_key_value_heads}")
    if self.head_dim is None and self.hidden_size % self.num_attention_heads:
      raise ConfigError(f"hidden_size={self.hidden_size} is not divisible by "
                        f"num_attention_heads={self.num_attention_heads}; set head_dim")
    if self.resolved_head_dim % 2:
      raise ConfigError(f"head_dim={self.resolved_head_dim} must be even for rotary embeddings")
    if self.num_experts_per_tok > self.num_experts:
      raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok} exceeds "
                        f"num_experts={self.num_experts}")
    if self.qk_norm not in QK_NORMS:
      raise ConfigError(f"qk_norm={self.qk_norm!r}; choose one of {QK_NORMS}")
    bad_layers = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
    if bad_layers:
      raise ConfigError(f"mlp_only_layers has indices outside [0, {self.num_hidden_layers}): {bad_layers}")
    if self.dense_layer_indices and self.intermediate_size < 1:
      raise ConfigError(f"layers {list(self.dense_layer_indices)} are dense MLPs but "
                        f"intermediate_size={self.intermediate_size}")
    if not self.moe_layer_indices:
      raise ConfigError("the config has no MoE layer (check decoder_sparse_step and mlp_only_layers)")

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads

  @property
  def eos_ids(self) -> tuple[int, ...]:
    """The end-of-sequence token ids (`eos_token_id` may be one id, several, or None)."""
    eos = self.eos_token_id
    return () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)

  @property
  def k_pre(self) -> int:
    """The top-k the checkpoint was trained at (HF `num_experts_per_tok`)."""
    return self.num_experts_per_tok

  def is_moe_layer(self, layer: int) -> bool:
    return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0

  @property
  def moe_layer_indices(self) -> tuple[int, ...]:
    return tuple(i for i in range(self.num_hidden_layers) if self.is_moe_layer(i))

  @property
  def dense_layer_indices(self) -> tuple[int, ...]:
    return tuple(i for i in range(self.num_hidden_layers) if not self.is_moe_layer(i))

  @property
  def layer_runs(self) -> tuple["LayerRun", ...]:
    """The decoder as runs of consecutive equal layers (MoE or dense), each stored stacked (model/layout.py)."""
    runs, start = [], 0
    moe_before = 0
    for i in range(1, self.num_hidden_layers + 1):
      if i == self.num_hidden_layers or self.is_moe_layer(i) != self.is_moe_layer(start):
        is_moe = self.is_moe_layer(start)
        runs.append((start, i, is_moe, moe_before))
        moe_before += (i - start) if is_moe else 0
        start = i
    name = lambda a, b: "layers" if len(runs) == 1 else f"layers_{a}_to_{b - 1}"
    return tuple(LayerRun(name(a, b), a, b, m, s) for a, b, m, s in runs)

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)


class LayerRun(NamedTuple):
  """Decoder layers start .. stop - 1, all MoE or all dense, whose parameters are stacked under `name`
  ("layers" when the whole decoder is one run, else "layers_<start>_to_<last>")."""

  name: str
  start: int
  stop: int
  is_moe: bool
  moe_start: int  # how many MoE layers come before the run (its first MoE layer's slot in per-MoE-layer k)

  @property
  def size(self) -> int:
    return self.stop - self.start


def config_to_dict(cfg: ModelConfig) -> dict:
  """JSON-ready dict of every field (tuples become lists)."""
  out = dataclasses.asdict(cfg)
  return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def config_from_dict(raw: dict, source: str = "model config") -> ModelConfig:
  """Inverse of config_to_dict; unknown or missing fields raise ConfigError naming `source`.

  Files written before the expert backend left ModelConfig (it held `expert_backend`, and a boolean
  `qk_norm` for OLMoE's whole-projection norm) still load.
  """
  raw = {k: v for k, v in raw.items() if k not in _DROPPED_FIELDS}
  if isinstance(raw.get("qk_norm"), bool):
    raw["qk_norm"] = "projection" if raw["qk_norm"] else "none"
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(raw) - fields)
  if unknown:
    raise ConfigError(f"{source}: unknown ModelConfig fields {unknown}")
  values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
  try:
    return ModelConfig(**values)
  except TypeError as e:
    raise ConfigError(f"{source}: {e}") from None
  except ConfigError as e:
    raise ConfigError(f"{source}: {e}") from None
