"""Mixtral (`MixtralForCausalLM`, e.g. mistralai/Mixtral-8x7B-v0.1): the top-k weights are always
renormalised, no q/k norm, no biases, every layer MoE; experts stored as w1 (gate), w3 (up), w2 (down)
under `block_sparse_moe`. Sliding-window attention is not implemented, so a `sliding_window` is refused."""

from phds_jax.model.config import ModelConfig
from phds_jax.model.families.registry import LLAMA_STYLE_NAMES, Family, HFFields, register

HF_DEFAULTS = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, hidden_act="silu", max_position_embeddings=4096 * 32, initializer_range=0.02,
    rms_norm_eps=1e-5, pad_token_id=None, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    sliding_window=None, num_experts_per_tok=2, num_local_experts=8, router_aux_loss_coef=0.001,
    rope_theta=1e6)

_MOE = "model.layers.{layer}.block_sparse_moe"
TENSOR_NAMES = {
    **{role: name for role, name in LLAMA_STYLE_NAMES.items() if not role.startswith(("moe.", "mlp."))},
    "moe.router": f"{_MOE}.gate.weight",
    "moe.experts.gate": f"{_MOE}.experts.{{expert}}.w1.weight",
    "moe.experts.down": f"{_MOE}.experts.{{expert}}.w2.weight",
    "moe.experts.up": f"{_MOE}.experts.{{expert}}.w3.weight",
}


def from_hf(f: HFFields) -> dict:
  window = f.get("sliding_window", (int,), allow_none=True)
  if window is not None:
    f.refuse(f"sliding_window={window} is not supported (sliding-window attention is not implemented); "
             "set it to null for full attention")
  width = f.get("intermediate_size", (int,))
  return dict(num_experts=f.get_aliased(("num_local_experts", "num_experts"), (int,)),
              moe_intermediate_size=width, intermediate_size=width, norm_topk_prob=True)


def to_hf(cfg: ModelConfig) -> dict:
  if (not cfg.norm_topk_prob or cfg.qk_norm != "none" or cfg.qkv_bias or cfg.o_bias or cfg.clip_qkv is not None
      or cfg.shared_expert_intermediate_size or cfg.dense_layer_indices):
    raise ValueError("Mixtral renormalises the top k and has no q/k norm, biases, clip_qkv, shared expert or "
                     "dense layers")
  return dict(num_local_experts=cfg.num_experts, intermediate_size=cfg.moe_intermediate_size, sliding_window=None)


FAMILY = register(Family(
    model_type="mixtral", architecture="MixtralForCausalLM", hf_defaults=HF_DEFAULTS, from_hf=from_hf, to_hf=to_hf,
    tensor_names=TENSOR_NAMES,
    presets={
        # mistralai/Mixtral-8x7B-v0.1: 8 experts, top-2, GQA 32/8.
        "mixtral-8x7b": ModelConfig(
            model_type="mixtral", vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=14336,
            intermediate_size=14336, max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6,
            norm_topk_prob=True, router_aux_loss_coef=0.02, bos_token_id=1, eos_token_id=2),
        "tiny-mixtral": ModelConfig(
            model_type="mixtral", vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            intermediate_size=32, max_position_embeddings=256, rope_theta=1e6, norm_topk_prob=True,
            bos_token_id=0, eos_token_id=2),
    }))
