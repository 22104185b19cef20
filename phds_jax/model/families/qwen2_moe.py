"""Qwen1.5-MoE / Qwen2-MoE (`Qwen2MoeForCausalLM`, e.g. Qwen/Qwen1.5-MoE-A2.7B): qkv bias, a shared expert
behind a sigmoid gate, dense layers by `decoder_sparse_step` / `mlp_only_layers`."""

from phds_jax.model.config import ModelConfig
from phds_jax.model.families.registry import LLAMA_STYLE_NAMES, Family, HFFields, register

HF_DEFAULTS = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
    num_key_value_heads=16, hidden_act="silu", max_position_embeddings=32768, initializer_range=0.02,
    rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0, use_sliding_window=False,
    decoder_sparse_step=1, moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
    num_experts_per_tok=4, num_experts=60, norm_topk_prob=False, router_aux_loss_coef=0.001, mlp_only_layers=[],
    qkv_bias=True, pad_token_id=None, bos_token_id=None, eos_token_id=None)


def from_hf(f: HFFields) -> dict:
  if f.get("use_sliding_window", (bool,)):
    f.refuse("use_sliding_window=true is not supported")
  return dict(num_experts=f.get("num_experts", (int,)), moe_intermediate_size=f.get("moe_intermediate_size", (int,)),
              intermediate_size=f.get("intermediate_size", (int,)), norm_topk_prob=f.get("norm_topk_prob", (bool,)),
              shared_expert_intermediate_size=f.get("shared_expert_intermediate_size", (int,)),
              decoder_sparse_step=f.get("decoder_sparse_step", (int,)), mlp_only_layers=f.int_list("mlp_only_layers"),
              qkv_bias=f.get("qkv_bias", (bool,)))


def to_hf(cfg: ModelConfig) -> dict:
  if cfg.qk_norm != "none" or cfg.o_bias or cfg.clip_qkv is not None or not cfg.shared_expert_intermediate_size:
    raise ValueError("Qwen2-MoE has a shared expert and no qk_norm, o_bias or clip_qkv")
  return dict(num_experts=cfg.num_experts, intermediate_size=cfg.intermediate_size,
              moe_intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
              shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
              decoder_sparse_step=cfg.decoder_sparse_step, mlp_only_layers=list(cfg.mlp_only_layers),
              qkv_bias=cfg.qkv_bias, use_sliding_window=False)


FAMILY = register(Family(
    model_type="qwen2_moe", architecture="Qwen2MoeForCausalLM", hf_defaults=HF_DEFAULTS, from_hf=from_hf,
    to_hf=to_hf, tensor_names=LLAMA_STYLE_NAMES,
    presets={
        # Qwen/Qwen1.5-MoE-A2.7B: 60 routed experts, top-4, a shared expert with a sigmoid gate, qkv bias.
        "qwen1.5-moe-a2.7b": ModelConfig(
            model_type="qwen2_moe", vocab_size=151936, hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
            num_key_value_heads=16, num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
            intermediate_size=5632, shared_expert_intermediate_size=5632, max_position_embeddings=8192,
            rms_norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True, router_aux_loss_coef=0.001,
            bos_token_id=151643, eos_token_id=151643),
        "tiny-qwen-moe": ModelConfig(
            model_type="qwen2_moe", vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            intermediate_size=96, shared_expert_intermediate_size=48, max_position_embeddings=256,
            rms_norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True, mlp_only_layers=(2,), bos_token_id=0,
            eos_token_id=2),
    }))
