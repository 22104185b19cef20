"""ModelConfig: one frozen description of an OLMoE or Qwen1.5/2-MoE decoder, with HF field names.

Family differences are plain fields (`qk_norm`, `qkv_bias`, `shared_expert_intermediate_size`, ...), so
the layers never branch on a model name. Presets hold the released models' hyper-parameters and the
tiny shapes the tests use.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from phds_jax.errors import ConfigError

EXPERT_BACKENDS = ("auto", "chunked", "sorted", "ragged", "reference")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of a MoE decoder. Field names follow transformers' config.json where one exists."""

  model_type: str  # "olmoe" or "qwen2_moe": decides the HF name map, not the maths
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
  qk_norm: bool = False  # OLMoE: RMSNorm over the whole q and k projections
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
  expert_backend: str = "auto"  # one of EXPERT_BACKENDS; all compute the same function ("auto": per platform)

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
    if self.expert_backend not in EXPERT_BACKENDS:
      raise ConfigError(f"expert_backend={self.expert_backend!r}; choose one of {EXPERT_BACKENDS}")
    if self.qk_norm and self.resolved_head_dim * self.num_attention_heads != self.hidden_size:
      raise ConfigError("qk_norm (OLMoE) needs num_attention_heads * head_dim == hidden_size")
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

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)


# OLMoE-1B-7B-0125 (allenai): 64 experts, top-8, q/k norm, untied embeddings.
OLMOE_1B_7B_0125 = ModelConfig(
    model_type="olmoe", vocab_size=50304, hidden_size=2048, num_hidden_layers=16,
    num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
    moe_intermediate_size=1024, intermediate_size=1024, max_position_embeddings=4096,
    rms_norm_eps=1e-5, rope_theta=10000.0, qk_norm=True, router_aux_loss_coef=0.01, pad_token_id=1,
    eos_token_id=50279)

# Qwen1.5-MoE-A2.7B: 60 routed experts, top-4, a shared expert with a sigmoid gate, qkv bias.
QWEN1_5_MOE_A2_7B = ModelConfig(
    model_type="qwen2_moe", vocab_size=151936, hidden_size=2048, num_hidden_layers=24,
    num_attention_heads=16, num_key_value_heads=16, num_experts=60, num_experts_per_tok=4,
    moe_intermediate_size=1408, intermediate_size=5632, shared_expert_intermediate_size=5632,
    max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True,
    router_aux_loss_coef=0.001, bos_token_id=151643, eos_token_id=151643)

# Tiny shapes for tests and CPU demos: same code paths, GQA on.
TINY_OLMOE = ModelConfig(
    model_type="olmoe", vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
    intermediate_size=32, max_position_embeddings=256, qk_norm=True, pad_token_id=1, eos_token_id=2)

TINY_QWEN_MOE = ModelConfig(
    model_type="qwen2_moe", vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
    intermediate_size=96, shared_expert_intermediate_size=48, max_position_embeddings=256,
    rms_norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True, mlp_only_layers=(2,), bos_token_id=0,
    eos_token_id=2)

PRESETS = {
    "olmoe-1b-7b-0125": OLMOE_1B_7B_0125,
    "qwen1.5-moe-a2.7b": QWEN1_5_MOE_A2_7B,
    "tiny-olmoe": TINY_OLMOE,
    "tiny-qwen-moe": TINY_QWEN_MOE,
}


def preset(name: str) -> ModelConfig:
  """Returns the preset called `name` (see PRESETS)."""
  try:
    return PRESETS[name]
  except KeyError:
    raise ConfigError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}") from None


def config_to_dict(cfg: ModelConfig) -> dict:
  """JSON-ready dict of every field (tuples become lists)."""
  out = dataclasses.asdict(cfg)
  return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def config_from_dict(raw: dict, source: str = "model config") -> ModelConfig:
  """Inverse of config_to_dict; unknown or missing fields raise ConfigError naming `source`."""
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
