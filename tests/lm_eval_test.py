"""The lm-evaluation-harness adapter on a local task (a YAML and a JSONL file the test writes)."""

import json
import os
import shutil
import sys

import numpy as np
import pytest

import phds_jax as pj
from phds_jax.data import pipeline as data
from phds_jax.eval import scoring as evaluate
from conftest import build_hf_model, write_toy_tokenizer

TASK_YAML = """task: phds_toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("lm_eval")
  model_dir = root / "model"
  build_hf_model("olmoe_gqa_clip_norm").save_pretrained(model_dir)
  tok_dir = write_toy_tokenizer(root / "tok")
  for name in os.listdir(tok_dir):
    shutil.copy(os.path.join(tok_dir, name), model_dir / name)
  rng = np.random.RandomState(0)
  items = []
  for i in range(12):
    words = [f"w{j}" for j in rng.choice(40, 4, replace=False)]
    items.append({"context": "say first of : " + " ".join(words), "choices": words[:3], "answer": int(i % 3)})
  data = root / "items.jsonl"
  data.write_text("".join(json.dumps(it) + "\n" for it in items))
  task_dir = root / "tasks"
  task_dir.mkdir()
  (task_dir / "phds_toy_mc.yaml").write_text(TASK_YAML.format(data=data))
  return {"model": str(model_dir), "items": items, "tasks": str(task_dir)}


def test_simple_evaluate_matches_our_multiple_choice(setup, monkeypatch):
  import lm_eval
  from lm_eval import evaluator
  from lm_eval.tasks import TaskManager

  # the environment report lm-eval adds to its results (torch's collect_env: pip and nvidia-smi in
  # subprocesses, ~1 s per call) is not ours to test
  monkeypatch.setattr(evaluator, "add_env_info", lambda results: None)

  import phds_jax.eval.lm_eval_adapter  # noqa: F401  (registers "phds_jax")

  cfg, params = pj.load(setup["model"])
  tokenizer = data.load_tokenizer(setup["model"])
  # only our task: indexing lm-eval's thousands of built-in task YAMLs takes ~25 s and tests nothing of ours
  tasks = TaskManager(include_path=setup["tasks"], include_defaults=False)
  for k in (1, 8):
    out = lm_eval.simple_evaluate(model="phds_jax", model_args=f"path={setup['model']},k={k}",
                                  tasks=["phds_toy_mc"], task_manager=tasks)
    acc = out["results"]["phds_toy_mc"]["acc,none"]
    spaced = [dict(it, choices=[" " + c for c in it["choices"]]) for it in setup["items"]]
    ours = evaluate.multiple_choice(cfg, params, tokenizer, spaced, k=k, batch_size=16)  # the adapter's batch
    assert acc == pytest.approx(ours["acc"])


def test_adapter_methods(setup):
  from phds_jax.eval.lm_eval_adapter import PhdsLM

  class Request:
    def __init__(self, *args):
      self.args = args

  lm = PhdsLM(path=setup["model"], k="2")
  (score, greedy), = lm.loglikelihood([Request("say first of : w1", " w1")])
  assert score < 0 and isinstance(greedy, bool)
  text = "w1 w2 w3 w4 w5 w6"
  (rolling,) = lm.loglikelihood_rolling([Request(text)])
  ids = lm._encode(text)
  whole = evaluate.continuation_logprobs(lm.cfg, lm.params, [([lm.prefix_token_id], ids)], k=2)[0]
  assert rolling == pytest.approx(whole, abs=1e-4)
  (generated,) = lm.generate_until([Request("say first of : w1 w2", {"until": ["w9"], "max_gen_toks": 5})])
  assert isinstance(generated, str) and "w9" not in generated
  with pytest.raises(ValueError, match="k=99 must lie in"):
    PhdsLM(path=setup["model"], k=99)
  with pytest.raises(ValueError, match=r"unknown model argument\(s\) \['kk'\]; valid ones are \['path', 'k', "):
    PhdsLM(path=setup["model"], kk=4, device="cpu")  # lm-eval's own `device` is accepted
  # a Roster-of-Experts ensemble for the log-likelihoods (model_args are strings)
  ensemble = PhdsLM(path=setup["model"], k="2", roe_members="3", roe_tau="1.0", roe_seed="0")
  (noisy, _), = ensemble.loglikelihood([Request("say first of : w1", " w1")])
  assert noisy < 0 and noisy != pytest.approx(score, abs=1e-6)
  assert PhdsLM(path=setup["model"], k="2", roe_members="1", roe_tau="1.0").roe is None  # member 0 only
  with pytest.raises(ValueError, match="RoE tau has 3 entries"):
    PhdsLM(path=setup["model"], roe_members="2", roe_tau="0.1:0.2:0.3")
  request = Request("say first of : w1 w2", {"until": ["w9"], "max_gen_toks": 5})
  assert ensemble.generate_until([request]) == ensemble.generate_until([request])  # seeded routings


def test_command_line_wrapper_lists_the_model(setup, monkeypatch, capsys):
  import functools

  from lm_eval.tasks import TaskManager

  from phds_jax.eval.lm_eval_adapter import cli

  # lm-eval's command line indexes its built-in tasks (~25 s) before it runs ours; skip that
  monkeypatch.setattr(TaskManager, "__init__", functools.partialmethod(TaskManager.__init__, include_defaults=False))
  monkeypatch.setattr(sys, "argv", ["phds-lm-eval", "--model", "phds_jax", "--model_args", f"path={setup['model']},k=2",
                                    "--tasks", "phds_toy_mc", "--include_path", setup["tasks"], "--limit", "3"])
  cli()
  assert "phds_toy_mc" in capsys.readouterr().out
