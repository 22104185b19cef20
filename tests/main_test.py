"""The command line: convert HF <-> orbax, and the built-in default job, as a user runs them."""

import json
import os
import subprocess
import sys

import pytest

import phds_jax as pj
from phds_jax import checkpoint
from phds_jax import convert
from phds_jax import errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, cwd=ROOT):
  result = subprocess.run([sys.executable, "-m", "phds_jax.main", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def _tensor_bytes(model_dir):
  from phds_jax.hf.safetensors_io import SafetensorsFile

  out = {}
  for name in os.listdir(model_dir):
    if name.endswith(".safetensors"):
      f = SafetensorsFile(os.path.join(model_dir, name))
      out.update({t: f.get(t).tobytes() for t in f.names})
  return out


def test_convert_command_round_trip(hf_dirs, tmp_path):
  src, _ = hf_dirs["qwen_sparse_step"]
  orbax_dir, back = str(tmp_path / "orbax"), str(tmp_path / "back")
  _main("--config=configs/convert.py", f"--config.src={src}", f"--config.dst={orbax_dir}")
  assert os.path.isfile(os.path.join(orbax_dir, checkpoint.CONFIG_FILE))
  out = _main("--config=configs/convert.py", f"--config.src={orbax_dir}", f"--config.dst={back}")
  assert back in out
  assert _tensor_bytes(back) == _tensor_bytes(src)


def test_convert_library_dtype_and_errors(hf_dirs, tmp_path):
  src, _ = hf_dirs["olmoe_gqa_clip_norm"]
  dst = convert.convert(src, str(tmp_path / "o"), dtype="bfloat16")
  cfg, params = checkpoint.load_model(dst)
  assert {str(x.dtype) for x in __import__("jax").tree.leaves(params)} == {"bfloat16"}
  with pytest.raises(FileExistsError):
    convert.convert(src, dst)
  with pytest.raises(errors.CheckpointError, match="neither an HF model directory"):
    convert.convert(str(tmp_path), str(tmp_path / "x"))
  with pytest.raises(ValueError, match="to='gguf'"):
    convert.convert(src, str(tmp_path / "y"), to="gguf")


def test_orbax_checkpoint_mismatch_is_reported(hf_dirs, tmp_path):
  cfg, params = pj.hf.load_pretrained(hf_dirs["olmoe_gqa_clip_norm"][0])
  path = checkpoint.save_model(cfg, params, str(tmp_path / "m"))
  raw = json.load(open(os.path.join(path, checkpoint.CONFIG_FILE)))
  raw["num_hidden_layers"] = 3
  json.dump(raw, open(os.path.join(path, checkpoint.CONFIG_FILE), "w"))
  with pytest.raises(errors.CheckpointError, match="do not match"):
    checkpoint.load_model(path)
  raw["bogus_field"] = 1
  json.dump(raw, open(os.path.join(path, checkpoint.CONFIG_FILE), "w"))
  with pytest.raises(errors.ConfigError, match="unknown ModelConfig fields \\['bogus_field'\\]"):
    checkpoint.load_model(path)


def test_sweep_job_runs_end_to_end(tmp_path):
  out = _main("--config=configs/sweep.py", f"--workdir={tmp_path}", "--config.seq_len=16",
              "--config.k_values=1,2,8", "--config.repeats=1")
  rows = json.load(open(tmp_path / "sweep.json"))["rows"]
  assert [r["k"] for r in rows] == [1, 2, 8]
  assert rows[1]["top1_agreement"] == 1.0  # k=2 is k_pre, the reference
  assert "agree@k2" in out and os.path.isdir(tmp_path / "random_tiny_olmoe")


def test_builtin_default_runs_end_to_end_shortened(tmp_path):
  """configs/tiny.py as the README runs it, on the real data (fetched once into the cache), shortened."""
  out = _main("--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.pretrain.steps=3",
              "--config.pretrain.batch_size=4", "--config.train.steps=4", "--config.eval.every=2",
              "--config.checkpoint.every=2", "--config.log_every=2", "--config.builtin.text_docs=50")
  result = json.load(open(tmp_path / "results.json"))
  assert [r["k"] for r in result["rows"]] == [1, 2, 4]
  assert result["heldout_items"] == 200 and result["chance"] == 0.1
  assert "held-out acc PHDS" in out and os.path.isdir(tmp_path / "phds" / "hf_export")
  again = _main("--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.train.steps=4",
                "--config.builtin.text_docs=50")
  assert "using the cached base model" in again


def test_main_rejects_unknown_mode(tmp_path):
  result = subprocess.run([sys.executable, "-m", "phds_jax.main", "--config=configs/sweep.py",
                           "--config.mode=dance"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0 and "config.mode='dance'" in result.stderr


def test_presets_are_valid_and_init_shapes_match_hf_map():
  import jax

  from phds_jax.hf import param_map

  for name, cfg in pj.PRESETS.items():
    shapes = jax.eval_shape(lambda cfg=cfg: pj.init_params(cfg, jax.random.key(0)))
    flat = {tuple(p.key for p in path): leaf.shape
            for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    specs = {m.spec.path: m.spec.shape for m in param_map.param_specs(cfg)}
    assert flat == specs, name
    json.dumps(pj.hf.config_to_hf(cfg, "bfloat16"))  # every preset has an HF config.json
  olmoe = pj.preset("olmoe-1b-7b-0125")
  assert (olmoe.num_experts, olmoe.k_pre, olmoe.moe_intermediate_size) == (64, 8, 1024)
  qwen = pj.preset("qwen1.5-moe-a2.7b")
  assert (qwen.num_experts, qwen.k_pre, qwen.shared_expert_intermediate_size) == (60, 4, 5632)
  with pytest.raises(errors.ConfigError, match="unknown model preset"):
    pj.preset("gpt-5")


@pytest.mark.parametrize("changes, message", [
    (dict(num_experts_per_tok=0), "num_experts_per_tok must be a positive int"),
    (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads=3"),
    (dict(qk_norm="sometimes"), "qk_norm='sometimes'"),
    (dict(mlp_only_layers=(7,)), "mlp_only_layers has indices outside"),
    (dict(decoder_sparse_step=5), "no MoE layer"),
])
def test_model_config_validation(changes, message):
  with pytest.raises(errors.ConfigError, match=message):
    pj.preset("tiny-qwen-moe").replace(**changes)


def _load_config(name, arg=None):
  import importlib.util

  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_training_configs_derive_from_the_base_and_take_args():
  olmoe, qwen, tiny = _load_config("olmoe"), _load_config("qwen_moe"), _load_config("tiny")
  assert (olmoe.phds.k_values, olmoe.model.preset, olmoe.phds.anchor) == ("4,5,6,7,8", "olmoe-1b-7b-0125", True)
  assert (qwen.phds.k_values, qwen.model.preset) == ("1,2,3,4", "qwen1.5-moe-a2.7b")
  assert tiny.mode == "builtin" and tiny.phds.k_values == "1,2"
  custom = _load_config("olmoe", "k_values=2,4,8;steps=50;mesh.fsdp=4;anchor=false")
  assert (custom.phds.k_values, custom.train.steps, custom.mesh.fsdp, custom.phds.anchor) == ("2,4,8", 50, 4, False)
  with pytest.raises(ValueError, match="matches 0 fields"):
    _load_config("olmoe", "nonsense=1")


def test_command_line_overrides_reach_the_trainer(tmp_path):
  result = subprocess.run([sys.executable, "-m", "phds_jax.main", "--config=configs/olmoe.py:steps=7",
                           "--config.phds.k_values=2,4,8", "--config.model_path=/nonexistent/model",
                           f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0 and "/nonexistent/model" in result.stderr
  written = json.load(open(tmp_path / "config.json"))  # main records the resolved config first
  assert written["phds"]["k_values"] == "2,4,8" and written["train"]["steps"] == 7
