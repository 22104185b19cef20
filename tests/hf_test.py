"""HF checkpoint conversion: exact round trips, transformers loading our output, and every error case."""

import json
import logging
import os
import shutil

import numpy as np
import pytest

import phds_jax as pj
from phds_jax import errors
from phds_jax.io.hf.safetensors_io import SafetensorsFile
from conftest import HF_VARIANTS, build_hf_model, hf_logits


def _tensors(model_dir):
  """name -> (dtype string, raw bytes) for every tensor of an HF directory."""
  out = {}
  for name in sorted(os.listdir(model_dir)):
    if name.endswith(".safetensors"):
      f = SafetensorsFile(os.path.join(model_dir, name))
      for t in f.names:
        out[t] = (str(f.dtype(t)), f.shape(t), f.get(t).tobytes())
  return out


def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


@pytest.mark.parametrize("variant", sorted(HF_VARIANTS))
def test_round_trip_is_bit_exact(hf_dirs, variant, tmp_path):
  path, _ = hf_dirs[variant]
  cfg, params = pj.hf.load_pretrained(path)
  out = pj.hf.save_pretrained(cfg, params, str(tmp_path / "out"))
  assert _tensors(out) == _tensors(path)


def test_bfloat16_round_trip_is_bit_exact(tmp_path):
  import torch

  model = build_hf_model("qwen_sparse_step", dtype=torch.bfloat16)
  model.save_pretrained(tmp_path / "bf16")
  cfg, params = pj.hf.load_pretrained(str(tmp_path / "bf16"), dtype="bfloat16")
  pj.hf.save_pretrained(cfg, params, str(tmp_path / "out"))
  original = _tensors(tmp_path / "bf16")
  assert {v[0] for v in original.values()} == {"bfloat16"}
  assert _tensors(tmp_path / "out") == original
  assert json.load(open(tmp_path / "out" / "config.json"))["dtype"] == "bfloat16"


@pytest.mark.parametrize("variant", sorted(HF_VARIANTS))
def test_transformers_loads_our_output_cleanly(hf_dirs, variant, tmp_path, tokens, caplog):
  import transformers

  path, reference = hf_dirs[variant]
  cfg, params = pj.hf.load_pretrained(path)
  out = pj.hf.save_pretrained(cfg, params, str(tmp_path / "out"), max_shard_size=40_000)
  assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
  with caplog.at_level(logging.WARNING):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, output_loading_info=True, attn_implementation="eager")
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  assert not [r for r in caplog.records if "were not used" in r.message or "newly initialized" in r.message]
  k = cfg.k_pre
  np.testing.assert_array_equal(hf_logits(model, tokens, k), hf_logits(reference, tokens, k))


def test_sharded_checkpoint_loads_like_single_file(hf_dirs, tmp_path, tokens):
  path, _ = hf_dirs["olmoe_gqa_clip_norm"]
  cfg, params = pj.hf.load_pretrained(path)
  sharded = pj.hf.save_pretrained(cfg, params, str(tmp_path / "sharded"), max_shard_size=10_000)
  shards = [f for f in os.listdir(sharded) if f.endswith(".safetensors")]
  assert len(shards) > 3
  cfg2, params2 = pj.hf.load_pretrained(sharded)
  assert cfg2 == cfg
  np.testing.assert_array_equal(np.asarray(pj.forward(cfg, params, tokens)),
                                np.asarray(pj.forward(cfg2, params2, tokens)))


def test_load_places_params_on_a_sharding(hf_dirs):
  import jax

  path, _ = hf_dirs["qwen_norm_tied"]
  device = jax.devices()[0]
  seen = []

  def sharding(param_path, shape):
    seen.append(param_path)
    return jax.sharding.SingleDeviceSharding(device)

  cfg, params = pj.hf.load_pretrained(path, sharding=sharding)
  assert ("embed_tokens", "embedding") in seen and len(seen) == len(jax.tree.leaves(params))
  assert all(leaf.sharding == jax.sharding.SingleDeviceSharding(device) for leaf in jax.tree.leaves(params))


def test_save_copies_tokenizer_files(hf_dirs, tmp_path):
  path = _copy(hf_dirs["olmoe_plain_bias"][0], tmp_path / "src")
  (tmp_path / "src" / "tokenizer.json").write_text("{}")
  cfg, params = pj.hf.load_pretrained(path)
  out = pj.hf.save_pretrained(cfg, params, str(tmp_path / "out"), copy_files_from=path)
  assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors",
                                     "tokenizer.json"]


# ---- error cases: each raises a specific exception naming the culprit -------------------------------


def _edit_config(path, **changes):
  cfg_path = os.path.join(path, "config.json")
  raw = json.load(open(cfg_path))
  raw.update(changes)
  json.dump(raw, open(cfg_path, "w"))


def _rewrite_weights(path, edit):
  """Rewrites model.safetensors after `edit(dict name -> array)`."""
  from safetensors.numpy import save_file

  file = os.path.join(path, "model.safetensors")
  f = SafetensorsFile(file)
  tensors = {n: np.array(f.get(n)) for n in f.names}
  del f
  edit(tensors)
  save_file(tensors, file, metadata={"format": "pt"})


def test_unsupported_model_type(hf_dirs, tmp_path):
  path = _copy(hf_dirs["olmoe_plain_bias"][0], tmp_path / "m")
  _edit_config(path, model_type="deepseek_v3")
  with pytest.raises(errors.UnsupportedModelError, match=r"config.json: model_type='deepseek_v3' is not supported; "
                                                         r"supported: \['mixtral', 'olmoe', 'qwen2_moe', 'qwen3_moe'\]"):
    pj.hf.load_pretrained(path)


@pytest.mark.parametrize("changes, error, message", [
    (dict(hidden_act="gelu"), errors.UnsupportedModelError, "hidden_act='gelu'"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1.0, "factor": 2.0}),
     errors.UnsupportedModelError, "rope_type='yarn'"),
    (dict(num_experts="eight"), errors.ConfigError, "field 'num_experts' must be int"),
    (dict(num_experts_per_tok=99), errors.ConfigError, "num_experts_per_tok=99 exceeds"),
])
def test_bad_config_fields(hf_dirs, tmp_path, changes, error, message):
  path = _copy(hf_dirs["olmoe_plain_bias"][0], tmp_path / "m")
  _edit_config(path, **changes)
  with pytest.raises(error, match=message):
    pj.hf.load_pretrained(path)


def test_qwen_sliding_window_is_refused(hf_dirs, tmp_path):
  path = _copy(hf_dirs["qwen_sparse_step"][0], tmp_path / "m")
  _edit_config(path, use_sliding_window=True)
  with pytest.raises(errors.UnsupportedModelError, match="use_sliding_window"):
    pj.hf.load_pretrained(path)


def test_malformed_config_json(hf_dirs, tmp_path):
  path = _copy(hf_dirs["olmoe_plain_bias"][0], tmp_path / "m")
  open(os.path.join(path, "config.json"), "w").write("{not json")
  with pytest.raises(errors.ConfigError, match=r"config.json: malformed JSON"):
    pj.hf.load_pretrained(path)
  open(os.path.join(path, "config.json"), "w").write("[1, 2]")
  with pytest.raises(errors.ConfigError, match="expected a JSON object"):
    pj.hf.load_pretrained(path)
  os.remove(os.path.join(path, "config.json"))
  with pytest.raises(errors.ConfigError, match="no config.json"):
    pj.hf.load_pretrained(path)


def test_missing_tensor(hf_dirs, tmp_path):
  path = _copy(hf_dirs["olmoe_plain_bias"][0], tmp_path / "m")
  _rewrite_weights(path, lambda t: t.pop("model.layers.1.mlp.experts.4.up_proj.weight"))
  with pytest.raises(errors.MissingTensorError, match=r"model\.layers\.1\.mlp\.experts\.4\.up_proj\.weight"):
    pj.hf.load_pretrained(path)


def test_extra_tensor(hf_dirs, tmp_path):
  path = _copy(hf_dirs["olmoe_plain_bias"][0], tmp_path / "m")
  _rewrite_weights(path, lambda t: t.update({"model.layers.0.mlp.experts.99.up_proj.weight": np.zeros(3)}))
  with pytest.raises(errors.UnexpectedTensorError, match=r"experts\.99\.up_proj\.weight"):
    pj.hf.load_pretrained(path)


def test_ignorable_tensors_are_ignored(hf_dirs, tmp_path):
  path = _copy(hf_dirs["qwen_norm_tied"][0], tmp_path / "m")
  _rewrite_weights(path, lambda t: t.update({
      "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32),
      "lm_head.weight": t["model.embed_tokens.weight"]}))
  pj.hf.load_pretrained(path)


def test_wrong_shape(hf_dirs, tmp_path):
  path = _copy(hf_dirs["olmoe_plain_bias"][0], tmp_path / "m")
  _rewrite_weights(path, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((5, 32),
                                                                                                np.float32)}))
  with pytest.raises(errors.ShapeMismatchError,
                     match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' in .*model\.safetensors has shape "
                           r"\[5, 32\]; config.json implies \[32, 32\]"):
    pj.hf.load_pretrained(path)


def test_missing_shard_file(hf_dirs, tmp_path):
  cfg, params = pj.hf.load_pretrained(hf_dirs["olmoe_plain_bias"][0])
  path = pj.hf.save_pretrained(cfg, params, str(tmp_path / "m"), max_shard_size=20_000)
  victim = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[1]
  os.remove(os.path.join(path, victim))
  with pytest.raises(errors.MissingShardError, match=victim):
    pj.hf.load_pretrained(path)
  with pytest.raises(FileNotFoundError):  # MissingShardError is also a FileNotFoundError
    pj.hf.load_pretrained(path)


def test_malformed_index_and_corrupt_safetensors(hf_dirs, tmp_path):
  cfg, params = pj.hf.load_pretrained(hf_dirs["olmoe_plain_bias"][0])
  path = pj.hf.save_pretrained(cfg, params, str(tmp_path / "m"), max_shard_size=20_000)
  index = os.path.join(path, "model.safetensors.index.json")
  open(index, "w").write('{"metadata": {}}')
  with pytest.raises(errors.CheckpointError, match="malformed safetensors index"):
    pj.hf.load_pretrained(path)
  single = _copy(hf_dirs["olmoe_plain_bias"][0], tmp_path / "single")
  open(os.path.join(single, "model.safetensors"), "wb").write(b"\xff" * 16)
  with pytest.raises(errors.CheckpointError, match="corrupt safetensors header"):
    pj.hf.load_pretrained(single)


def test_no_weights_at_all(hf_dirs, tmp_path):
  path = _copy(hf_dirs["olmoe_plain_bias"][0], tmp_path / "m")
  os.remove(os.path.join(path, "model.safetensors"))
  with pytest.raises(errors.MissingShardError, match="no weights found"):
    pj.hf.load_pretrained(path)


def test_pickle_weights_refused_unless_opted_in(hf_dirs, tmp_path, tokens):
  path, _ = hf_dirs["qwen_sparse_step"]
  pickled = _copy(path, tmp_path / "m")
  _write_bin(pickled)  # transformers 5 only writes safetensors: make the legacy file by hand
  os.remove(os.path.join(pickled, "model.safetensors"))
  with pytest.raises(errors.UnsafeWeightsError, match=r"pytorch_model\.bin.*allow_pickle=True"):
    pj.hf.load_pretrained(pickled)
  cfg, params = pj.hf.load_pretrained(pickled, allow_pickle=True)
  cfg_ref, params_ref = pj.hf.load_pretrained(path)
  np.testing.assert_array_equal(np.asarray(pj.forward(cfg, params, tokens)),
                                np.asarray(pj.forward(cfg_ref, params_ref, tokens)))


def _write_bin(path):
  import torch
  from safetensors.numpy import load_file

  state = {k: torch.from_numpy(v) for k, v in load_file(os.path.join(path, "model.safetensors")).items()}
  torch.save(state, os.path.join(path, "pytorch_model.bin"))


def test_save_refuses_existing_dir_and_overwrites_on_request(hf_dirs, tmp_path):
  cfg, params = pj.hf.load_pretrained(hf_dirs["olmoe_plain_bias"][0])
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("x")
  with pytest.raises(FileExistsError, match="overwrite=True"):
    pj.hf.save_pretrained(cfg, params, str(out))
  pj.hf.save_pretrained(cfg, params, str(out), overwrite=True)
  assert "keep.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)
  assert sorted(os.listdir(tmp_path)) == ["out"]


def test_failed_save_leaves_nothing(hf_dirs, tmp_path):
  cfg, params = pj.hf.load_pretrained(hf_dirs["olmoe_plain_bias"][0])
  bad = dict(params)
  bad["norm"] = {"scale": params["norm"]["scale"][:3]}
  with pytest.raises(errors.ShapeMismatchError, match=r"param norm/scale has shape \[3\]"):
    pj.hf.save_pretrained(cfg, bad, str(tmp_path / "out"))
  missing = {k: v for k, v in params.items() if k != "lm_head"}
  with pytest.raises(errors.MissingTensorError, match="lm_head/kernel"):
    pj.hf.save_pretrained(cfg, missing, str(tmp_path / "out"))
  extra = dict(params, bogus={"w": params["norm"]["scale"]})
  with pytest.raises(errors.UnexpectedTensorError, match="bogus/w"):
    pj.hf.save_pretrained(cfg, extra, str(tmp_path / "out"))
  assert os.listdir(tmp_path) == []


def test_failure_mid_write_leaves_nothing(hf_dirs, tmp_path, monkeypatch):
  from phds_jax.io.hf import safetensors_io

  cfg, params = pj.hf.load_pretrained(hf_dirs["olmoe_plain_bias"][0])
  calls = []
  real = safetensors_io.write_file

  def flaky(path, tensors, metadata=None):
    calls.append(path)
    if len(calls) == 3:
      raise OSError("disk full")
    real(path, tensors, metadata)

  monkeypatch.setattr(pj.hf, "write_file", flaky)
  with pytest.raises(OSError, match="disk full"):
    pj.hf.save_pretrained(cfg, params, str(tmp_path / "out"), max_shard_size=20_000)
  assert len(calls) == 3 and os.listdir(tmp_path) == []


def test_bad_dtype_argument(hf_dirs):
  with pytest.raises(ValueError, match=r"dtype='int8'; choose one of"):
    pj.hf.load_pretrained(hf_dirs["olmoe_plain_bias"][0], dtype="int8")
