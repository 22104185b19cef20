"""Qwen3-MoE (`Qwen3MoeForCausalLM`, e.g. Qwen/Qwen3-30B-A3B): RMSNorm of q and k per head (before RoPE),
no shared expert, `norm_topk_prob`, dense layers by `decoder_sparse_step` / `mlp_only_layers`, an explicit
head_dim, one `attention_bias` switch for q/k/v/o."""

from phds_jax.model.config import ModelConfig
from phds_jax.model.families.registry import LLAMA_STYLE_NAMES, Family, HFFields, register

HF_DEFAULTS = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24, num_attention_heads=32,
    num_key_value_heads=4, hidden_act="silu", max_position_embeddings=32768, initializer_range=0.02,
    rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0, attention_bias=False,
    use_sliding_window=False, decoder_sparse_step=1, moe_intermediate_size=768, num_experts_per_tok=8,
    num_experts=128, norm_topk_prob=False, router_aux_loss_coef=0.001, mlp_only_layers=[], pad_token_id=None,
    bos_token_id=None, eos_token_id=None)


def from_hf(f: HFFields) -> dict:
  if f.get("use_sliding_window", (bool,)):
    f.refuse("use_sliding_window=true is not supported (sliding-window attention is not implemented)")
  bias = f.get("attention_bias", (bool,))
  return dict(num_experts=f.get_aliased(("num_experts", "num_local_experts"), (int,)),
              moe_intermediate_size=f.get("moe_intermediate_size", (int,)),
              intermediate_size=f.get("intermediate_size", (int,)), norm_topk_prob=f.get("norm_topk_prob", (bool,)),
              decoder_sparse_step=f.get("decoder_sparse_step", (int,)), mlp_only_layers=f.int_list("mlp_only_layers"),
              qk_norm="head", qkv_bias=bias, o_bias=bias)


def to_hf(cfg: ModelConfig) -> dict:
  if cfg.qk_norm != "head" or cfg.qkv_bias != cfg.o_bias or cfg.clip_qkv is not None \
      or cfg.shared_expert_intermediate_size:
    raise ValueError("Qwen3-MoE needs qk_norm='head', qkv_bias == o_bias, no clip_qkv and no shared expert")
  return dict(num_experts=cfg.num_experts, moe_intermediate_size=cfg.moe_intermediate_size,
              intermediate_size=cfg.intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
              decoder_sparse_step=cfg.decoder_sparse_step, mlp_only_layers=list(cfg.mlp_only_layers),
              attention_bias=cfg.qkv_bias, use_sliding_window=False, sliding_window=None)


FAMILY = register(Family(
    model_type="qwen3_moe", architecture="Qwen3MoeForCausalLM", hf_defaults=HF_DEFAULTS, from_hf=from_hf,
    to_hf=to_hf, tensor_names=LLAMA_STYLE_NAMES,
    presets={
        # Qwen/Qwen3-30B-A3B: 128 experts, top-8, per-head q/k norm, head_dim 128 (4096-wide attention).
        "qwen3-30b-a3b": ModelConfig(
            model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
            num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
            intermediate_size=6144, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
            norm_topk_prob=True, qk_norm="head", router_aux_loss_coef=0.001, bos_token_id=151643,
            eos_token_id=151645),
        "tiny-qwen3-moe": ModelConfig(
            model_type="qwen3_moe", vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            intermediate_size=96, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1000000.0,
            norm_topk_prob=True, qk_norm="head", bos_token_id=0, eos_token_id=2),
    }))
