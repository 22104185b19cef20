"""The command line: convert HF <-> orbax, and the built-in default job, as a user runs them."""

import json
import os
import subprocess
import sys

import pytest

import phds_jax as pj
from phds_jax.train import builtin
from phds_jax.io import checkpoint
from phds_jax.io import convert
from phds_jax import errors
from phds_jax import main
from conftest import ROOT, load_config


def _cli(*args, cwd=ROOT):
  """The real command line in a subprocess: (exit status, stdout, stderr)."""
  result = subprocess.run([sys.executable, "-m", "phds_jax.main", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)
  return result.returncode, result.stdout, result.stderr


def _tensor_bytes(model_dir):
  from phds_jax.io.hf.safetensors_io import SafetensorsFile

  out = {}
  for name in os.listdir(model_dir):
    if name.endswith(".safetensors"):
      f = SafetensorsFile(os.path.join(model_dir, name))
      out.update({t: f.get(t).tobytes() for t in f.names})
  return out


def test_convert_command_round_trip_is_quiet(hf_dirs, tmp_path):
  src, _ = hf_dirs["qwen_sparse_step"]
  orbax_dir, back = str(tmp_path / "orbax"), str(tmp_path / "back")
  status, out, err = _cli("--config=configs/convert.py", f"--config.model_path={src}",
                          f"--config.convert.dst={orbax_dir}")
  assert status == 0, err[-3000:]
  assert os.path.isfile(os.path.join(orbax_dir, checkpoint.CONFIG_FILE))
  # what a person reads: the one line saying where the output went, no library logs
  assert out.strip().splitlines() == [f"wrote {orbax_dir}"] and not err.strip(), (out, err)
  main.run(load_config("convert", **{"model_path": orbax_dir, "convert.dst": back}))
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
  from phds_jax.io.load import ORBAX_CONFIG_FILE

  assert ORBAX_CONFIG_FILE == checkpoint.CONFIG_FILE  # pj.load detects orbax without importing it
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


def test_sweep_job_runs_end_to_end(tmp_path, capsys):
  rows = main.run(load_config("sweep", **{"data.seq_len": 16, "eval.k_values": "1,2,8",
                                          "eval.latency.repeats": 1}), str(tmp_path))
  assert [r["k"] for r in rows] == [1, 2, 8]
  assert json.load(open(tmp_path / "sweep.json"))["rows"] == rows
  assert rows[1]["top1_agreement"] == 1.0  # k=2 is k_pre, the reference
  assert "agree@k2" in capsys.readouterr().out and os.path.isdir(tmp_path / "random_tiny_olmoe")


@pytest.mark.slow
def test_builtin_default_runs_end_to_end_shortened(tmp_path, capsys):
  """configs/tiny.py as the README runs it, shortened: data, base, PHDS and the SFT control, the table."""
  tiniest = {f"model.overrides.{k}": v for k, v in dict(hidden_size=32, moe_intermediate_size=32,
                                                          intermediate_size=32, num_hidden_layers=1).items()}
  short = {"pretrain.steps": 3, "pretrain.batch_size": 4, "pretrain.seq_len": 64, "train.steps": 4, "eval.every": 4,
           "checkpoint.every": 4, "log_every": 2, "builtin.pretrain_items": 200, "builtin.finetune_items": 300, "train.batch_size": 4,
           "builtin.eval_items": 10, "builtin.cache": str(tmp_path / "cache"), "eval.k_values": "1,2", **tiniest}
  result = main.run(load_config("tiny", **short), str(tmp_path))
  assert json.load(open(tmp_path / "results.json")) == result
  assert [r["k"] for r in result["rows"]] == [1, 2]
  assert result["items_per_family"] == {"arith": 10, "after": 10, "pattern": 10} and result["chance"] == 0.1
  for row in result["rows"]:
    for model in ("base", "sft", "phds"):
      by_family = row[f"acc_{model}_by_family"]
      assert abs(sum(by_family[f] * n for f, n in result["items_per_family"].items()) / 30 - row[f"acc_{model}"]) < 1e-9
  out = capsys.readouterr().out
  assert "acc PHDS" in out and "the control: plain SFT at k_pre" in out
  assert os.path.isdir(tmp_path / "phds" / "hf_export") and not os.path.isdir(tmp_path / "sft" / "hf_export")
  assert main.run(load_config("tiny", **short), str(tmp_path)) == result  # a re-run: nothing trained or scored
  again = capsys.readouterr().out
  assert "nothing left to do" in again and "(scored before:" in again and "acc PHDS" in again
  # a second run reuses the base model: the same checkpoint, not trained again
  config = load_config("tiny", **short)
  before = os.path.getmtime(tmp_path / "base" / "best" / checkpoint.CONFIG_FILE)
  assert builtin.base_model(config, builtin.prepare_data(config), str(tmp_path)) == str(tmp_path / "base" / "best")
  assert "using the cached base model" in capsys.readouterr().out
  assert os.path.getmtime(tmp_path / "base" / "best" / checkpoint.CONFIG_FILE) == before
  # data are cached per setting: this shortened set is never what the default run reads
  paths = builtin.prepare_data(config)
  assert "arith2-after2-pattern1_pre200_ft300_eval10" in paths["eval"] and builtin.data_paths(config) == paths
  default = builtin.data_paths(load_config("tiny", **{"builtin.cache": str(tmp_path / "cache")}))
  assert "_pre20000_ft4000_eval300" in default["eval"]
  # evaluated pattern contexts were never trained on
  trained = {json.loads(line)["prompt"] for name in ("pretrain", "sft") for line in open(paths[name])}
  evaluated = [json.loads(line) for line in open(paths["eval"])]
  assert not {it["context"] for it in evaluated if it["family"] == "pattern"} & trained


def test_user_errors_are_one_message_before_any_work(tmp_path):
  """The bare design-card command names exactly the two missing fields; typos and bad values are listed
  together, with exit status 2 and no traceback; nothing is written."""
  status, out, err = _cli("--config=configs/qwen_moe.py", f"--workdir={tmp_path / 'w'}")
  assert status == 2 and "Traceback" not in err
  assert err.startswith("error: configs/qwen_moe.py: 2 problem(s)")
  assert "- model_path: required" in err and "- data.train_files: required" in err
  status, _, err = _cli("--config=configs/olmoe.py:steps=7", "--config.trian.steps=3")
  assert status == 2 and "Traceback" not in err and "no config field 'trian'" in err
  status, _, err = _cli("--config=configs/nope.py")
  assert status == 2 and err.startswith("error: --config=configs/nope.py: no such config file") and "Trace" not in err
  status, _, err = _cli("--config=configs/tiny.py", "--config.train.steps=abc")
  assert status == 2 and "--config.train.steps=abc: 'abc' is not a valid value for train.steps" in err
  # the built-in run checks its fields too; every ModelConfig field can be overridden from the command line
  status, _, err = _cli("--config=configs/tiny.py", "--config.model.overrides.num_experts=4",
                        "--config.phds.k_values=0,2", "--config.phds.mask=sofft", f"--workdir={tmp_path / 'w'}")
  assert status == 2 and "Traceback" not in err, err
  assert "phds.k_values='0,2': k=0 is outside [1, 4] (the model has 4 experts)" in err and "phds.mask='sofft'" in err
  assert not os.path.exists(tmp_path / "w")


def test_reading_a_config_does_not_import_jax():
  """`import phds_jax` imports its public names on first use, and a config file is plain data: the command
  line's mistakes in flags and files are reported without importing JAX (1.4 s), orbax or grain."""
  code = ("import sys; import phds_jax; from phds_jax.main import _flag_error; "
          "from phds_jax.cli import config_docs; sys.path.insert(0, 'configs'); import tiny, olmoe, serve; "
          "tiny.get_config(); olmoe.get_config('steps=7'); serve.get_config(); "
          "print(sorted(m for m in ('jax', 'orbax', 'grain', 'torch', 'transformers') if m in sys.modules))")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "[]"


def test_config_problems_are_all_listed(hf_dirs, tmp_path):
  src, _ = hf_dirs["olmoe_gqa_clip_norm"]  # 8 experts
  config = load_config("olmoe", "steps=7", **{
      "model_path": src, "data.train_files": str(tmp_path / "none*.jsonl"), "phds.k_values": "2,4,9",
      "mesh.data": 3, "model.expert_backend": "magic", "train.trainable": "atention", "train.on_nan": "ignore",
      "axis_rules.embed": "fsdp,model"})
  with pytest.raises(errors.ConfigProblems) as info:
    main.run(config, str(tmp_path / "w"))
  problems = info.value.problems
  assert len(problems) == 7, problems
  assert any(p.startswith("axis_rules.embed='fsdp,model': no mesh axis 'model'") for p in problems)
  assert "model.expert_backend='magic'" in problems[0]
  assert any("data.train_files" in p and "matches no file" in p for p in problems)
  assert any(p.startswith("phds.k_values='2,4,9': k=9 is outside [1, 8]") for p in problems)
  assert any("unknown subset 'atention'" in p for p in problems)
  assert "train.on_nan='ignore'; choose one of stop, skip" in problems
  assert any(p.startswith("mesh: 1 devices cannot fill mesh") for p in problems)
  config = load_config("olmoe", **{"model_path": src, "data.train_files": src + "/config.json",
                                   "train.batch_size": 6, "train.grad_accum": 4})
  with pytest.raises(errors.ConfigProblems, match="train.batch_size=6 must be a multiple of train.grad_accum=4"):
    main.run(config, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")
  for name, changes, message in [
      ("sweep", {"mode": "dance"}, "mode='dance'; choose one of train, prepare, builtin, eval, sweep, convert"),
      ("eval", {"model_path": str(tmp_path / "missing")}, "model_path='.*missing': no such directory"),
      ("eval", {"model_path": src, "eval.k_values": "0,2"}, r"eval.k_values='0,2': k=0 is outside \[1, 8\]"),
      ("convert", {"model_path": src}, "convert.dst: required"),
      ("sweep", {"model_path": str(tmp_path)}, "neither an HF model directory")]:
    with pytest.raises(errors.ConfigProblems, match=message):
      main.run(load_config(name, **changes), str(tmp_path / "w"))


def test_presets_are_valid_and_init_shapes_match_hf_map():
  import jax

  from phds_jax.io.hf import param_map

  for name, cfg in pj.PRESETS.items():
    json.dumps(pj.hf.config_to_hf(cfg, "bfloat16"))  # every preset has an HF config.json
    # layers repeat: the first four (all presets' dense/MoE patterns start within them) keep tracing cheap
    cfg = cfg.replace(num_hidden_layers=min(cfg.num_hidden_layers, 4))
    shapes = jax.eval_shape(lambda cfg=cfg: pj.init_params(cfg, jax.random.key(0)))
    flat = {tuple(p.key for p in path): leaf.shape
            for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    specs = {m.spec.path: m.spec.shape for m in param_map.param_specs(cfg)}
    assert flat == specs, name
  # (the released models' presets equal their config.json: tests/hf_config_test.py)
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


def test_training_configs_derive_from_the_base_and_take_args():
  olmoe, qwen, tiny = load_config("olmoe"), load_config("qwen_moe"), load_config("tiny")
  assert (olmoe.phds.k_values, olmoe.model.preset, olmoe.phds.anchor) == ("4,5,6,7,8", "olmoe-1b-7b-0125", True)
  assert (qwen.phds.k_values, qwen.model.preset) == ("1,2,3,4", "qwen1.5-moe-a2.7b")
  assert tiny.mode == "builtin" and tiny.phds.k_values == "1,2"
  custom = load_config("olmoe", "k_values=2,4,8;steps=50;mesh.fsdp=4;anchor=false")
  assert (custom.phds.k_values, custom.train.steps, custom.mesh.fsdp, custom.phds.anchor) == ("2,4,8", 50, 4, False)
  with pytest.raises(ValueError, match="matches 0 fields"):
    load_config("olmoe", "nonsense=1")


def _fields(config, prefix=""):
  out = set()
  for key, value in config.items():
    out |= _fields(value, f"{prefix}{key}.") if hasattr(value, "items") and key != "overrides" else {prefix + key}
  return out


def test_every_config_file_speaks_the_base_configs_language():
  from phds_jax.cli.configs import base_config

  base = _fields(base_config())
  names = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py"))
  assert {"convert", "eval", "mixtral", "olmoe", "qwen3_moe", "qwen_moe", "sweep", "tiny"} <= set(names)
  for name in names:
    config = load_config(name)
    assert base <= _fields(config), (name, sorted(base - _fields(config)))
    doc = open(os.path.join(ROOT, "configs", f"{name}.py")).read()
    assert f"--config=configs/{name}.py" in doc, name  # the launch command is in the docstring
  assert (load_config("qwen3_moe").model.preset, load_config("mixtral").model.preset) == ("qwen3-30b-a3b",
                                                                                        "mixtral-8x7b")
