"""OLMoE (`OlmoeForCausalLM`, e.g. allenai/OLMoE-1B-7B-0125): q/k RMSNorm over the whole projection,
optional clip_qkv, one bias switch for q/k/v/o, every layer MoE, no shared expert."""

from phds_jax.model.config import ModelConfig
from phds_jax.model.families.registry import LLAMA_STYLE_NAMES, Family, HFFields, register

HF_DEFAULTS = dict(
    vocab_size=50304, hidden_size=2048, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=16,
    hidden_act="silu", max_position_embeddings=4096, initializer_range=0.02, rms_norm_eps=1e-5, pad_token_id=1,
    bos_token_id=None, eos_token_id=50279, tie_word_embeddings=False, rope_theta=10000.0, attention_bias=False,
    clip_qkv=None, num_experts_per_tok=8, num_experts=64, router_aux_loss_coef=0.01, norm_topk_prob=False)


def from_hf(f: HFFields) -> dict:
  bias = f.get("attention_bias", (bool,))
  clip = f.get("clip_qkv", (int, float), allow_none=True)
  width = f.get("intermediate_size", (int,))
  return dict(num_experts=f.get_aliased(("num_experts", "num_local_experts"), (int,)), moe_intermediate_size=width, intermediate_size=width,
              norm_topk_prob=f.get("norm_topk_prob", (bool,)), qk_norm="projection",
              clip_qkv=None if clip is None else float(clip), qkv_bias=bias, o_bias=bias)


def to_hf(cfg: ModelConfig) -> dict:
  if (cfg.qkv_bias != cfg.o_bias or cfg.qk_norm != "projection" or cfg.shared_expert_intermediate_size
      or cfg.dense_layer_indices or cfg.intermediate_size != cfg.moe_intermediate_size):
    raise ValueError("OLMoE needs qk_norm='projection', qkv_bias == o_bias, one intermediate size, every layer "
                     "MoE and no shared expert")
  return dict(num_experts=cfg.num_experts, intermediate_size=cfg.moe_intermediate_size,
              norm_topk_prob=cfg.norm_topk_prob, attention_bias=cfg.qkv_bias, clip_qkv=cfg.clip_qkv)


FAMILY = register(Family(
    model_type="olmoe", architecture="OlmoeForCausalLM", hf_defaults=HF_DEFAULTS, from_hf=from_hf, to_hf=to_hf,
    tensor_names=LLAMA_STYLE_NAMES,
    presets={
        # allenai/OLMoE-1B-7B-0125: 64 experts, top-8, q/k norm, untied embeddings.
        "olmoe-1b-7b-0125": ModelConfig(
            model_type="olmoe", vocab_size=50304, hidden_size=2048, num_hidden_layers=16, num_attention_heads=16,
            num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, moe_intermediate_size=1024,
            intermediate_size=1024, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
            qk_norm="projection", router_aux_loss_coef=0.01, pad_token_id=1, eos_token_id=50279),
        # Tiny shapes for tests and CPU demos: same code paths, GQA on.
        "tiny-olmoe": ModelConfig(
            model_type="olmoe", vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            intermediate_size=32, max_position_embeddings=256, qk_norm="projection", pad_token_id=1,
            eos_token_id=2),
    }))
