"""config.json parsing: the released models' files (transformers 4 style) give the presets exactly."""

import pytest

import phds_jax as pj
from phds_jax import errors

# config.json of allenai/OLMoE-1B-7B-0125 and Qwen/Qwen1.5-MoE-A2.7B as published (transformers 4.x style:
# top-level rope_theta, torch_dtype; Qwen omits qkv_bias and mlp_only_layers, which take their defaults).
OLMOE_0125 = {
    "architectures": ["OlmoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "clip_qkv": None, "eos_token_id": 50279, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 1024, "max_position_embeddings": 4096,
    "model_type": "olmoe", "norm_topk_prob": False, "num_attention_heads": 16, "num_experts": 64,
    "num_experts_per_tok": 8, "num_hidden_layers": 16, "num_key_value_heads": 16,
    "output_router_logits": False, "pad_token_id": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 10000.0, "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.47.0.dev0", "use_cache": True, "vocab_size": 50304}
QWEN_A2_7B = {
    "architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "decoder_sparse_step": 1, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 5632, "max_position_embeddings": 8192,
    "max_window_layers": 21, "model_type": "qwen2_moe", "moe_intermediate_size": 1408,
    "norm_topk_prob": False, "num_attention_heads": 16, "num_experts": 60, "num_experts_per_tok": 4,
    "num_hidden_layers": 24, "num_key_value_heads": 16, "output_router_logits": False, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "shared_expert_intermediate_size": 5632,
    "sliding_window": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.40.0.dev0", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936}


@pytest.mark.parametrize("raw, preset", [(OLMOE_0125, "olmoe-1b-7b-0125"), (QWEN_A2_7B, "qwen1.5-moe-a2.7b")])
def test_released_configs_give_the_presets(raw, preset):
  assert pj.hf.config_from_hf(raw) == pj.preset(preset)


@pytest.mark.parametrize("preset", ["olmoe-1b-7b-0125", "qwen1.5-moe-a2.7b", "tiny-olmoe", "tiny-qwen-moe"])
def test_config_round_trips_through_hf_json(preset):
  cfg = pj.preset(preset)
  assert pj.hf.config_from_hf(pj.hf.config_to_hf(cfg, "bfloat16")) == cfg


def test_transformers_reads_our_config_json():
  import transformers

  for preset in ("olmoe-1b-7b-0125", "qwen1.5-moe-a2.7b"):
    raw = pj.hf.config_to_hf(pj.preset(preset), "bfloat16")
    hf_cfg = transformers.AutoConfig.for_model(**raw)
    assert hf_cfg.num_experts == raw["num_experts"]
    assert hf_cfg.rope_parameters["rope_theta"] == raw["rope_parameters"]["rope_theta"]


def test_num_local_experts_alias():
  raw = dict(OLMOE_0125)
  raw["num_local_experts"] = raw.pop("num_experts")
  assert pj.hf.config_from_hf(raw).num_experts == 64


def test_configs_with_no_family_equivalent_cannot_be_written():
  with pytest.raises(errors.UnsupportedModelError, match="no Qwen2MoeForCausalLM config.json equivalent"):
    pj.hf.config_to_hf(pj.preset("tiny-qwen-moe").replace(qk_norm="projection"), "float32")
  with pytest.raises(errors.UnsupportedModelError, match="no OlmoeForCausalLM config.json equivalent"):
    pj.hf.config_to_hf(pj.preset("tiny-olmoe").replace(qk_norm="none"), "float32")
  with pytest.raises(errors.UnsupportedModelError, match="no MixtralForCausalLM config.json equivalent"):
    pj.hf.config_to_hf(pj.preset("tiny-mixtral").replace(norm_topk_prob=False), "float32")
  with pytest.raises(errors.UnsupportedModelError, match="no Qwen3MoeForCausalLM config.json equivalent"):
    pj.hf.config_to_hf(pj.preset("tiny-qwen3-moe").replace(qk_norm="projection"), "float32")


def test_unregistered_family_lists_the_supported_ones():
  raw = dict(OLMOE_0125, model_type="deepseek_v3")
  with pytest.raises(errors.UnsupportedModelError,
                     match=r"model_type='deepseek_v3' is not supported; supported: \['mixtral', 'olmoe', "
                           r"'qwen2_moe', 'qwen3_moe'\]"):
    pj.hf.config_from_hf(raw)


@pytest.mark.parametrize("model_type, changes, message", [
    ("mixtral", dict(sliding_window=4096), "sliding_window=4096 is not supported"),
    ("qwen3_moe", dict(use_sliding_window=True, sliding_window=4096), "use_sliding_window=true is not supported"),
])
def test_sliding_windows_are_refused(model_type, changes, message):
  import transformers

  raw = transformers.AutoConfig.for_model(model_type, **changes).to_dict()
  with pytest.raises(errors.UnsupportedModelError, match=message):
    pj.hf.config_from_hf(raw)


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "mixtral-8x7b", "tiny-qwen3-moe", "tiny-mixtral"])
def test_new_family_presets_round_trip_through_transformers_configs(name):
  import transformers

  cfg = pj.preset(name)
  raw = pj.hf.config_to_hf(cfg, "bfloat16")
  hf_cfg = transformers.AutoConfig.for_model(**raw)
  assert type(hf_cfg).__name__ == {"qwen3_moe": "Qwen3MoeConfig", "mixtral": "MixtralConfig"}[cfg.model_type]
  assert pj.hf.config_from_hf(hf_cfg.to_dict()) == cfg


def test_old_checkpoint_configs_with_expert_backend_still_load():
  from phds_jax.model.config import config_from_dict, config_to_dict

  raw = config_to_dict(pj.preset("tiny-olmoe"))
  assert "expert_backend" not in raw and raw["qk_norm"] == "projection"
  old = dict(raw, expert_backend="ragged", qk_norm=True)
  assert config_from_dict(old) == pj.preset("tiny-olmoe")
  assert config_from_dict(dict(raw, qk_norm=False)).qk_norm == "none"
