"""experiments/: the study's data split, its runs, a shortened end-to-end run, and summarize's arithmetic."""

import dataclasses
import json
import os
import sys

import numpy as np
import pytest

from conftest import load_config
from experiments import agreement
from experiments import collect
from experiments import data
from experiments import figures
from experiments import local
from experiments import pod
from experiments import roe
from experiments import runs as runs_lib
from experiments import stats
from experiments import study
from experiments import summarize
from experiments import verdicts
from experiments.settings import DEFAULT
from phds_jax import main
from phds_jax.cli import configs


def test_seed_data_never_trains_on_an_evaluation_item(tmp_path):
  split = data.prepare_seed_data(DEFAULT, str(tmp_path), seed=3)
  assert set(split["tasks"]) == set(DEFAULT.synthetic_tasks)
  train = [json.loads(line) for line in open(tmp_path / "train.jsonl")]
  evaluated = set()
  for name, (n_eval, _) in DEFAULT.synthetic_tasks.items():
    items = [json.loads(line) for line in open(tmp_path / f"eval_{name}.jsonl")]
    assert len(items) == split["tasks"][name]["eval_items"] == min(n_eval, 150 if name == "arith" else n_eval)
    assert all(0 <= it["answer"] < len(it["choices"]) == 10 for it in items)
    evaluated |= {it["context"] for it in items}
  assert sum(split["tasks"][name]["eval_items"] for name in DEFAULT.synthetic_tasks) >= 1000
  assert split["tasks"]["after"]["train_items"] == 0  # the family never fine-tuned on
  assert not any(r["prompt"].startswith("after ") for r in train)
  assert len(train) == sum(t["train_items"] for t in split["tasks"].values())
  assert not evaluated & {r["prompt"] for r in train}
  heldout = [json.loads(line) for line in open(tmp_path / "heldout.jsonl")]
  assert {r["prompt"] for r in heldout} == evaluated
  assert data.prepare_seed_data(DEFAULT, str(tmp_path), seed=3) == split  # written once


def test_roe_validation_items_are_never_evaluated_and_new_ones_come_first():
  validation = roe.validation_items(DEFAULT, seed=3, per_task=25)
  for family, (evaluation, fine_tune) in data.seed_items(DEFAULT, 3).items():
    chosen = [it["context"] for it in validation[family]]
    assert len(chosen) == 25 and not set(chosen) & {it["context"] for it in evaluation}
    trained = {it["context"] for it in fine_tune}
    if family in ("arith", "after"):  # every fact is evaluated or fine-tuned on: fine-tuning items
      assert set(chosen) <= trained or family == "after"
    else:
      assert not set(chosen) & trained
  assert roe.validation_items(DEFAULT, seed=3, per_task=25) == validation


def test_roe_taus_are_one_per_model_or_one_per_layer():
  assert roe.parse_taus("0.5, 0:0:1:1") == [0.5, (0.0, 0.0, 1.0, 1.0)]
  assert [roe.tau_name(t) for t in roe.parse_taus("0.25,1:1:0:0")] == ["0.25", "1:1:0:0"]
  for bad in ("0", "0:0:0:0", "-1:1"):
    with pytest.raises(SystemExit):
      roe.parse_args([f"--taus={bad}"])


def test_runs_change_one_thing_of_the_reference():
  scale = DEFAULT.scales["tiny"]
  runs = {r.name: r for r in runs_lib.runs(scale)}
  for k in scale.k_grid:  # the oracle family: fixed k, hard mask, no anchoring, selected at its own k
    fields = runs[f"oracle_k{k}"].fields
    assert fields["phds.k_values"] == str(k) and fields["phds.mask"] == "hard" and not fields["phds.anchor"]
  reference = runs["phds"].fields
  assert reference["phds.k_values"] == "1,2,3,4" and reference["phds.soft_mask_eps"] == 1e-6
  for name in ("phds_no_anchor", "phds_train_attention", "phds_train_experts", "phds_train_router",
               "phds_eps_1e-3", "phds_eps_1e-9", "phds_hard_mask", "phds_narrow_k"):
    changed = {key for key in reference if runs[name].fields[key] != reference[key]}
    assert len(changed) == 1, (name, changed)
  assert [r.name for r in runs_lib.select(scale, ["oracles"])][0] == "base"  # the base is always evaluated
  with pytest.raises(SystemExit, match="unknown group"):
    runs_lib.select(scale, ["oracle"])


def test_every_tiny_run_config_passes_the_config_check(tmp_path):
  from phds_jax.cli import modes

  scale = DEFAULT.scales["tiny"]
  for run in runs_lib.runs(scale)[1:]:
    config = runs_lib.finetune_config(DEFAULT, run, "", str(tmp_path), str(tmp_path), seed=0, scale=scale)
    config.model_path, config.model.random_init = "", True  # no base on disk here
    problems = [p for p in modes.problems(config) if "train_files" not in p and "tokenizer" not in p]
    assert not problems, (run.name, problems)


def test_pod_scale_prints_launcher_commands_and_a_plan_estimate(tmp_path, capsys):
  plan = {"peak_flops_per_device": 1e12, "hbm_bandwidth_per_device": 1e9,
          "programs": [{"name": "train step", "flops": 3e12, "min_bytes": 1e9}]}
  (tmp_path / "plan.json").write_text(json.dumps(plan))
  assert pod.plan_minutes(str(tmp_path / "plan.json"), steps=20) == pytest.approx(1.0)  # 3 s x 20 steps
  study.main("study", ["oracles", "phds"], ["--scale=olmoe", "--seeds=0,1", "--dry-run", "--zone=us-west4-a",
                                            f"--plan={tmp_path / 'plan.json'}", "--out=gs://b/s",
                                            "--config.model_path=/m"])
  out = capsys.readouterr().out
  commands = [line for line in out.splitlines() if line.startswith("phds-launch")]
  fine_tunes = [r for r in runs_lib.select(DEFAULT.scales["olmoe"], ["oracles", "phds"]) if r.name != "base"]
  assert len(commands) == 2 * len(fine_tunes)  # per seed: every oracle, phds and phds_no_anchor
  assert all("--zone us-west4-a --accelerator v5e-16" in c and c.endswith("--config.model_path=/m") for c in commands)
  assert "--workdir=gs://b/s/seed1/oracle_k8" in out and "100 min per run" in out  # 2000 steps x 3 s
  # real SFT data, the same for every seed (the seed orders it and draws k), and how to put it there
  assert all("--config.data.prepared=gs://b/s/sft/olmoe" in c and "train_files" not in c for c in commands)
  assert ("python -m phds_jax.main --config=configs/prepare.py:olmoe --config.tokenizer_path=/m "
          "--config.data.train_files=hf:allenai/tulu-3-sft-mixture --config.data.val_fraction=0.002129 "
          "--config.data.prepared=gs://b/s/sft/olmoe") in out
  with pytest.raises(SystemExit):
    study.parse_args("study", ["phds"], ["--scale=qwen"])  # no --zone
  study.main("study", ["baseline", "oracles"], ["--scale=olmoe", "--seeds=0", "--dry-run", "--zone=z",
                                                "--stage=evaluate", "--out=gs://b/s", "--config.model_path=/m"])
  out = capsys.readouterr().out
  commands = [line for line in out.splitlines() if line.startswith("phds-launch")]
  assert len(commands) == 1 + len(DEFAULT.scales["olmoe"].k_grid)  # the base and one oracle per k
  assert "--config.model_path=/m --config.tokenizer_path=/m" in commands[0]
  assert "--config.eval.latency.enabled=True" in commands[0] and "latency.enabled=False" in commands[1]
  assert "--config.model_path=gs://b/s/seed0/oracle_k1/best" in commands[1]
  assert all("--config.eval.k_values=1,2,4,6,8 " in c for c in commands)  # oracles too: at every k
  # standard benchmarks, every item (thousands per task), and the SFT data's held-out answers
  assert all("--config.eval.tasks=arc_easy:test_rc_5shot,arc_challenge:test_rc_5shot,hellaswag:val_rc_5shot," in c
             and "mmlu:rc_test" in c and "--config.data.prepared=gs://b/s/sft/olmoe --config.data.seq_len=2048" in c
             for c in commands)
  assert "37,682 items per k and checkpoint" in out and "phds-lm-eval --model phds_jax" in out
  assert "--config.mesh.fsdp=-1" in commands[1] and "--workdir=gs://b/s/seed0/oracle_k1/eval" in commands[1]
  with pytest.raises(SystemExit, match="give --config.model_path"):
    study.main("study", ["phds"], ["--scale=olmoe", "--dry-run", "--zone=z", "--stage=evaluate"])
  with pytest.raises(SystemExit, match="collect reads local files"):
    study.main("study", ["phds"], ["--scale=olmoe", "--stage=collect", "--out=gs://b/s"])


def _result(run, seed, predictions, answers, k_pre=2, nll=1.0):
  """A study_eval.json with one task whose predictions per k are given."""
  evaluation = {}
  for k, pred in predictions.items():
    correct = np.array(pred) == np.array(answers)
    evaluation[str(k)] = {"tasks": {"t": {"acc": float(correct.mean()), "acc_se": 0.0, "n": len(pred),
                                          "predictions": list(pred), "correct": correct.astype(int).tolist(),
                                          "answer_nll": (1.0 - correct).tolist()}},
                          "heldout_nll": nll + (k_pre - k)}
  return {"run": run, "group": "g", "seed": seed, "k_pre": k_pre, "evaluation": evaluation,
          "split": {"tasks": {"t": {"eval_items": len(answers), "train_items": 0}}}}


def test_summary_pairs_seeds_and_computes_agreement_the_papers_way(tmp_path):
  answers = [0, 0, 0, 0]
  results = []
  for seed, shift in ((0, 0), (1, 1), (2, 0)):
    results += [
        _result("phds", seed, {1: [0, 0, 0, 1], 2: [0, 0, 0, 0]}, answers),  # within: 3/4 agree at k=1
        _result("oracle_k1", seed, {1: [1, 1, 0, shift], 2: [0, 0, 0, 0]}, answers),
        _result("oracle_k2", seed, {1: [0, 0, 0, 0], 2: [0, 0, 0, 0]}, answers),
        _result("base", seed, {1: [1, 1, 1, 1], 2: [0, 0, 1, 1]}, answers)]
  for r in results:
    os.makedirs(tmp_path / f"seed{r['seed']}" / r["run"])
    (tmp_path / f"seed{r['seed']}" / r["run"] / "study_eval.json").write_text(json.dumps(r))
  runs = summarize.load_runs(str(tmp_path))
  # oracle family at k=1: oracle_k1@1 vs oracle_k2@2 = [1,1,0,shift] vs [0,0,0,0]
  assert stats.oracle_family_agreement(runs, 1, 2) == {0: 0.5, 1: 0.25, 2: 0.5}
  assert stats.per_seed(runs, "phds", stats.self_agreement_at(1, 2)) == {0: 0.75, 1: 0.75, 2: 0.75}
  tests = {(t.claim, t.name, t.endpoint): t for t in verdicts.tests(runs, [1, 2], 2)}
  # (c) per item: phds agrees [1,1,1,0]; the oracle family [0,0,1,1] (seeds 0, 2) or [0,0,1,0] (seed 1)
  family = "(c) agreement with k_pre: PHDS (within one checkpoint) minus the oracle family"
  c = tests[(family, "k=1", "agreement")].comparison
  assert c.mean == pytest.approx((0.25 + 0.5 + 0.25) / 3) and c.n == 12 and c.seeds == 3
  # controlled: plain SFT at k_pre (oracle_k2) predicts the same at k=1 and k=2: it agrees on every item
  within = "(c) agreement with k_pre within one checkpoint: PHDS minus plain SFT at k_pre"
  assert tests[(within, "k=1", "agreement")].comparison.mean == pytest.approx(-0.25)
  oracle = "(b) PHDS minus the oracle fine-tuned at k"
  b = tests[(oracle, "k=1", "accuracy")].comparison  # phds 0.75 vs oracle 0.5 / 0.25 / 0.5 per seed
  assert b.mean == pytest.approx(1 / 3) and b.low <= b.mean <= b.high
  assert tests[(oracle, "k=1", "answer NLL")].comparison.mean == pytest.approx(1 / 3)  # NLL = 1 - correct here
  assert all(t.comparison.p_holm >= t.comparison.p for t in tests.values())
  assert {t.comparison.verdict(t.expected) for t in tests.values()} <= {"holds", "contradicted", "differs",
                                                                         "inconclusive"}
  text, results = summarize.report(str(tmp_path), str(tmp_path / "RESULTS.md"), "cmd")
  assert "| base | 0.000 ± 0.000 | 0.500 ± 0.000 |" in text  # accuracy of the base at k=1, k=2
  assert results["agreement"]["oracle family"]["1"]["mean"] == pytest.approx(5 / 12)
  assert os.path.isfile(tmp_path / "accuracy_vs_k.png") and os.path.isfile(tmp_path / "agreement_vs_k.png")
  # one figure per claim, right after the claim's last table: (b) against the oracles and against plain SFT share one
  assert text.count("![claim_b.png](claim_b.png)") == 1 and os.path.isfile(tmp_path / "claim_b.png")
  assert text.index("![claim_b.png]") > text.index("**(b) PHDS minus plain SFT at k_pre, both dialled to k**")
  assert [figures.claim_key(c) for c in ("(c) agreement ...", "RoE (ii) k_low ...", "ablation: x minus y")] == [
      "c", "roe_ii", "ablations"]
  json.dumps(results, allow_nan=False)  # strict JSON: no NaN for missing runs
  assert "Holm p" in text and "Power: with 12 paired items" in text and "Cohen's kappa" in text
  record = summarize.per_seed_results(runs)  # RESULTS_seeds.json: small, per seed
  assert sorted(record) == ["0", "1", "2"] and record["1"]["base"]["evaluation"]["2"] == {
      "acc": {"t": 0.5}, "heldout_nll": 1.0}
  assert {c["verdict"] for c in results["claims"]} <= {"holds", "contradicted", "differs", "inconclusive"}
  assert "Roster of Experts" not in text

  # experiments/roe.py's outputs: M = 2 at k = 1, 2 on base and phds; M = 1 is the study's own evaluation
  def roe_row(predictions, tau="0.5"):
    correct = (np.array(predictions) == np.array(answers)).astype(int)
    return {"2": {"tau": tau, "validation": {"0.5": 0.5, "0:1": 0.25}, "heldout_nll": 1.0,
                  "tasks": {"t": {"acc": float(correct.mean()), "acc_se": 0.0, "n": 4, "predictions": predictions,
                                  "correct": correct.tolist(), "answer_nll": (1.0 - correct).tolist()}}}}
  for seed in (0, 1, 2):
    for model, rows in (("base", {"1": roe_row([0, 1, 1, 1]), "2": roe_row([0, 0, 1, 1])}),
                        ("phds", {"1": roe_row([0, 0, 0, 0], tau="0:1"), "2": roe_row([0, 0, 0, 0])})):
      os.makedirs(tmp_path / "roe" / f"seed{seed}", exist_ok=True)
      (tmp_path / "roe" / f"seed{seed}" / f"{model}.json").write_text(json.dumps(
          {"model": model, "seed": seed, "members": [2], "taus": ["0.5", "0:1"], "val_items": 5, "evaluation": rows}))
  cost = lambda ms, flops: {"decode_ms_per_token": ms, "flops_per_token": flops}
  latency = {"1": {"1": cost(1.0, 10.0), "2": cost(1.5, 24.0)}, "2": {"1": cost(2.0, 14.0), "2": cost(3.0, 28.0)}}
  (tmp_path / "roe" / "latency.json").write_text(json.dumps(latency))
  text, results = summarize.report(str(tmp_path), str(tmp_path / "RESULTS.md"), "cmd")
  assert "## Roster of Experts (RoE) at every k" in text and "| phds, M=2 | 0:1, 0:1, 0:1 | 0.5, 0.5, 0.5 |" in text
  roe = [c for c in results["claims"] if c["claim"].startswith("RoE")]
  assert len(results["claims"]) == len(tests) + len(roe)  # one Holm family: the study's and RoE's comparisons

  def find(claim, name, endpoint="accuracy"):
    found = [c for c in roe if c["claim"].startswith(f"RoE {claim}") and c["name"] == name and c["endpoint"] == endpoint]
    assert len(found) == 1, (claim, name)
    return found[0]["mean"]
  # (i): base at k=1 is 0.0 alone (study) and 0.25 with M=2; phds at k=1 is 0.75 alone, 1.0 with M=2
  assert find("(i)", "base M=2 k=1") == pytest.approx(0.25) and find("(i)", "phds M=2 k=1") == pytest.approx(0.25)
  assert find("(i)", "base M=2 k=1", "answer NLL") == pytest.approx(0.25)  # NLL = 1 - correct here
  # (ii): by measured time k=1 with 2 members (1.5 ms) is as cheap as k=2 alone (2.0 ms); by FLOPs (24 > 14) not
  assert sorted({c["name"] for c in roe if c["claim"].startswith("RoE (ii)")}) == [
      "base k=1 M=2 vs k=2", "phds k=1 M=2 vs k=2"]
  assert find("(ii)", "phds k=1 M=2 vs k=2") == pytest.approx(0.0)
  assert "(ii) by FLOPs per token: no (k_low, M > 1) setting" in text
  # (iii): phds - base under RoE at k=1: 1.0 - 0.25; interaction (1.0 - 0.75) - (0.25 - 0.0)
  assert find("(iii) PHDS", "M=2 k=1") == pytest.approx(0.75)
  assert find("(iii) interaction", "M=2 k=1") == pytest.approx(0.0)
  assert os.path.isfile(tmp_path / "roe_accuracy_vs_cost.png") and "![claim_roe_iii.png](claim_roe_iii.png)" in text
  json.dumps(results, allow_nan=False)


def test_agreement_driver_prints_both_families(tmp_path, monkeypatch, capsys):
  answers = [0, 0, 0, 0]
  for seed in (0, 1):
    for r in (_result("phds", seed, {1: [0, 0, 0, 1], 2: [0, 0, 0, 0]}, answers),
              _result("oracle_k1", seed, {1: [1, 1, 0, 0], 2: [0, 0, 0, 0]}, answers),
              _result("oracle_k2", seed, {1: [0, 0, 0, 0], 2: [0, 0, 0, 0]}, answers)):
      os.makedirs(tmp_path / f"seed{seed}" / r["run"])
      (tmp_path / f"seed{seed}" / r["run"] / "study_eval.json").write_text(json.dumps(r))
  monkeypatch.setattr(sys, "argv", ["agreement.py", f"--out={tmp_path}"])
  agreement.main()
  line = capsys.readouterr().out.splitlines()[1].split()
  assert line[:7] == ["1", "0.750", "±", "0.000", "0.500", "±", "0.000"] and line[-1] == "+50.0%"


@pytest.mark.slow
def test_tiny_study_end_to_end_shortened(tmp_path, capsys):
  """The synthetic base (built here: 1 layer, 32 wide, 4 experts, k_pre 2) and one PHDS fine-tune, a few steps
  each, evaluated at k = 1, 2 on three items per family; a re-run skips both."""
  from phds_jax.io import files

  scale = dataclasses.replace(DEFAULT.scales["tiny"], k_pre=2, k_grid=(1, 2), wide_k="1,2", narrow_k="2", steps=2)
  settings = dataclasses.replace(
      DEFAULT, scales={"tiny": scale}, base_root=str(tmp_path / "base"),
      synthetic_base={**DEFAULT.synthetic_base, "num_experts": 4, "k_pre": 2, "hidden_size": 32, "expert_size": 32,
                      "layers": 1, "steps": 2, "batch_size": 4, "seq_len": 64, "items": 140},
      synthetic_tasks={family: (3, 12) for family in DEFAULT.synthetic_tasks},
      finetune={**DEFAULT.finetune, "every": 2, "seq_len": 64})
  chosen = [r for r in runs_lib.runs(scale) if r.name in ("base", "phds")]
  out = str(tmp_path / "study")
  latency = {str(k): {"decode_ms_per_token": float(k), "prefill_tokens_per_s": 1.0, "device": "cpu"} for k in (1, 2)}
  local.write_json(os.path.join(out, "latency.json"), latency)  # measured once per study: kept (test time)
  local.run_tiny(settings, out, [1], chosen, files.cache_dir())
  assert json.load(open(os.path.join(out, "latency.json"))) == latency
  phds = json.load(open(os.path.join(out, "seed1", "phds", "study_eval.json")))
  assert phds["select_k"] == 2 and phds["selected_phase"] in ("start", "multi_k", "anchoring")
  assert sorted(phds["evaluation"]) == ["1", "2"]
  for name, task in phds["evaluation"]["2"]["tasks"].items():  # accuracy is the predictions against the answers
    answers = [json.loads(line)["answer"] for line in open(os.path.join(out, "data", "seed1", f"eval_{name}.jsonl"))]
    assert task["n"] == 3 and task["acc"] == pytest.approx(np.mean(np.array(task["predictions"]) == np.array(answers)))
  local.run_tiny(settings, out, [1], chosen, files.cache_dir())
  assert capsys.readouterr().out.count("done before, skipped") == 2
  text, _ = summarize.report(out, str(tmp_path / "RESULTS.md"), "cmd")
  assert "The base's validation loss by k" in text and "| phds |" in text
  assert f"Runs at commit `{phds['commit']}`; summary at `" in text
  assert f"| phds | seed 1: step {phds['best_step']} ({phds['selected_phase']}) |" in text

  # the pod-scale evaluation (configs/eval.py as --stage=evaluate launches it), collected: the same numbers
  tiny = {name: json.load(open(os.path.join(out, "seed1", name, "study_eval.json")))
          for name in ("base", "phds")}
  base, tokenizer_dir = local.build_base(settings, files.cache_dir(), print)
  extra = [f"--config.model_path={base}", f"--config.tokenizer_path={tokenizer_dir}"]
  commands = pod.eval_commands(settings, scale, chosen, [1], out, "zone", extra)
  assert [c[c.index("--name") + 1] for c in commands] == ["study-tiny-s1-base-eval", "study-tiny-s1-phds-eval"]
  assert "--config.model_path=" + os.path.join(out, "seed1", "phds", "best") in commands[1]
  base_flags = commands[0][commands[0].index("--") + 1:]  # test time: the base's job only, at k_pre only
  main.run(*_config_from_flags(base_flags + ["--config.eval.k_values=2",
                                             "--config.eval.latency.enabled=False"]))
  assert collect.collect(scale, chosen, [1], out) == ["seed 1 phds"]  # not evaluated: its tiny result stays
  after = json.load(open(os.path.join(out, "seed1", "base", "study_eval.json")))
  assert after["group"] == "baseline" and after["k_pre"] == 2 and after["scale"] == "tiny"
  assert list(after["evaluation"]) == ["2"]
  row, before = after["evaluation"]["2"], tiny["base"]["evaluation"]["2"]
  assert row["tasks"] == before["tasks"]  # acc, se, n and every predicted choice
  assert row["heldout_nll"] == pytest.approx(before["heldout_nll"], rel=1e-4)
  assert json.load(open(os.path.join(out, "seed1", "phds", "study_eval.json"))) == tiny["phds"]


def test_collect_takes_the_summary_and_the_base_latency(tmp_path):
  """collect: the fine-tune's summary.json fields and the base evaluation's latency rows (eval_job's
  eval_results.json layout), with the run's group and claim from runs.runs."""
  scale = DEFAULT.scales["olmoe"]
  out = tmp_path / "study"
  (out / "data" / "seed0").mkdir(parents=True)
  (out / "data" / "seed0" / "split.json").write_text(json.dumps({"seed": 0, "tasks": {}}))
  (out / "data" / "seed0" / "eval_logic.jsonl").write_text(
      "".join(json.dumps({"context": "q", "choices": ["a", "b"], "answer": a}) + "\n" for a in (1, 1)))
  task = {"acc": 0.5, "acc_se": 0.5, "acc_norm": 0.5, "acc_norm_se": 0.5, "n": 2, "predictions": [1, 0],
          "answer_logprobs": [-0.25, -2.0], "agreement": 1.0, "agreement_se": 0.0}
  for name, latency in (("base", {"decode_ms_per_token": 3.0}), ("phds", None)):
    rows = {str(k): {"tasks": {"/x/eval_logic.jsonl": task}, "nll": 2.0 + k} for k in scale.k_grid}
    for row in rows.values():
      row.update({"latency": latency} if latency else {})
    (out / "seed0" / name / "eval").mkdir(parents=True)
    (out / "seed0" / name / "eval" / "eval_results.json").write_text(json.dumps({"results": {name: rows}}))
  (out / "seed0" / "phds" / "summary.json").write_text(json.dumps({"best_step": 7, "select_k": 8,
                                                                   "selected_phase": "anchoring"}))
  chosen = runs_lib.select(scale, ["phds"])
  assert collect.collect(scale, chosen, [0], str(out)) == ["seed 0 phds_no_anchor"]
  phds = json.load(open(out / "seed0" / "phds" / "study_eval.json"))
  assert (phds["group"], phds["claim"], phds["best_step"]) == ("phds", "b,c,d", 7)
  assert phds["selected_phase"] == "anchoring"
  logic = {"acc": 0.5, "acc_se": 0.5, "n": 2, "predictions": [1, 0], "correct": [1, 0], "answer_nll": [0.25, 2.0]}
  assert phds["evaluation"]["8"] == {"tasks": {"logic": logic}, "heldout_nll": 10.0}
  assert json.load(open(out / "latency.json")) == {str(k): {"decode_ms_per_token": 3.0} for k in scale.k_grid}


def _config_from_flags(flags):
  """(config, workdir) from main.py's command-line flags: --config=configs/<name>.py, --workdir=DIR and
  --config.<field>=<value> (read as the field's type, as configs.apply_arg reads a config file's arg)."""
  options = dict(flag[2:].split("=", 1) for flag in flags)
  config = load_config(os.path.basename(options.pop("config"))[:-len(".py")])
  workdir = options.pop("workdir")
  configs.apply_arg(config, ";".join(f"{key[len('config.'):]}={value}" for key, value in options.items()))
  return config, workdir


def test_synthetic_base_builds_once_and_reports_accuracy_per_family_and_k(tmp_path, capsys):
  """A shrunken synthetic base (1 layer, 4 experts, k_pre 2, 3 steps): built, measured on two seeds' items,
  written as markdown and JSON whose accuracies are the scoring's; a second call finds it cached."""
  from experiments import synthetic_base
  from phds_jax.data import synthetic

  settings = dataclasses.replace(
      DEFAULT, base_root=str(tmp_path / "base"),
      synthetic_base={**DEFAULT.synthetic_base, "num_experts": 4, "k_pre": 2, "hidden_size": 32,
                      "expert_size": 16, "layers": 1, "steps": 3, "batch_size": 4, "seq_len": 64, "items": 140},
      synthetic_tasks={family: (6, 0) for family in synthetic.FAMILIES})
  report_file = str(tmp_path / "BASE.md")
  report = synthetic_base.main(["--seeds=0,1", f"--report={report_file}"], settings)
  assert sorted(report["accuracy"]) == ["0", "1"] and report["ks"] == [1, 2] and report["items_per_seed"] == 30
  for rows in report["accuracy"].values():
    for row in rows.values():
      assert set(row) == {*synthetic.FAMILIES, "mean"} and all(v * 6 == round(v * 6) for v in row.values()
                                                                if v is not row["mean"])
      assert row["mean"] == pytest.approx(np.mean([row[f] for f in synthetic.FAMILIES]))
  gaps = report["gap_k_pre_minus_k1"]
  assert gaps["0"] == pytest.approx(report["accuracy"]["0"]["2"]["mean"] - report["accuracy"]["0"]["1"]["mean"])
  assert len(report["specialisation"]["mutual_information"]) == 1  # one MoE layer
  assert json.load(open(tmp_path / "BASE.json"))["accuracy"] == report["accuracy"]
  text = open(report_file).read()
  assert "| 2 (k_pre) |" in text and "mutual information" in text
  capsys.readouterr()
  synthetic_base.main(["--seeds=0", f"--report={report_file}"], settings)
  assert "synthetic base: cached in" in capsys.readouterr().out


def test_the_reading_is_flagged_when_its_quoted_numbers_no_longer_match(tmp_path):
  from experiments import reading

  claim = "(b) PHDS minus the oracle fine-tuned at k"
  data = {"claims": [{"claim": claim, "name": "k=1", "endpoint": "accuracy", "mean": -0.0262, "verdict": "contradicted"}],
          "accuracy": {"phds": {"1": {"mean": 0.5571}}}, "roe": {"accuracy": {"phds M=2": {"1": {"mean": 0.561}}}}}
  text = ("Reading: PHDS loses at k = 1 (-0.026).\n\n" + reading.HEADING + " (checked by summarize.py)\n\n"
          f"- claim | {claim} | k=1 | accuracy | mean: -0.026\n- claim | {claim} | k=1 | accuracy | verdict: contradicted\n"
          "- table | accuracy | phds | 1: 0.557\n- table | roe.accuracy | phds M=2 | 1: 0.56\n\n## Later\n- table | x | y | 1: 5\n")
  path = tmp_path / "RESULTS_reading.md"
  path.write_text(text)
  assert reading.check(text, data) == (4, [])
  assert "its 4 quoted numbers match" in reading.flag(str(path), data, "today") and path.read_text() == text
  data["claims"][0].update(mean=-0.031, verdict="inconclusive")
  count, stale = reading.check(text, data)
  assert count == 4 and stale == [f"claim | {claim} | k=1 | accuracy | mean: quoted -0.026, now -0.031",
                                  f"claim | {claim} | k=1 | accuracy | verdict: quoted contradicted, now inconclusive"]
  assert "**out of date**: 2 of its 4" in reading.flag(str(path), data, "today")
  flagged = path.read_text()
  assert flagged.startswith(reading.BANNER + " (today): 2 of the 4") and flagged.endswith(text)
  reading.flag(str(path), data, "later")  # flagged again: one banner, the new one
  assert path.read_text().count(reading.BANNER) == 1 and "(later)" in path.read_text()
  data["claims"][0].update(mean=-0.026, verdict="contradicted")
  reading.flag(str(path), data, "fixed")
  assert path.read_text() == text  # the numbers match again: the banner goes
  del data["roe"]
  assert reading.check(text, data)[1] == ["table | roe.accuracy | phds M=2 | 1: quoted 0.56, not in this report"]


def test_collect_scores_pod_benchmarks_against_the_wheels_answers(tmp_path):
  """Pod-scale evaluations of OLMo suite benchmarks (no synthetic data dir): each item's correctness from
  the benchmark's own answers, the split's counts from the evaluation."""
  from phds_jax.data import olmo_tasks

  scale, spec = DEFAULT.scales["olmoe"], "boolq:val_rc_5shot"
  answers = [it["answer"] for it in olmo_tasks.load_task(spec)]
  task = {"acc": 0.0, "acc_se": 0.0, "n": len(answers), "predictions": [0] * len(answers),
          "answer_logprobs": [-1.0] * len(answers)}
  (tmp_path / "seed0" / "base" / "eval").mkdir(parents=True)
  (tmp_path / "seed0" / "base" / "eval" / "eval_results.json").write_text(json.dumps(
      {"results": {"base": {"8": {"tasks": {spec: task}, "nll": 1.5}}}}))
  assert collect.collect(scale, runs_lib.select(scale, ["baseline"]), [0], str(tmp_path)) == []
  base = json.load(open(tmp_path / "seed0" / "base" / "study_eval.json"))
  assert base["evaluation"]["8"]["tasks"][spec]["correct"] == [int(a == 0) for a in answers]
  assert base["split"]["tasks"] == {spec: {"eval_items": 3270, "train_items": 0}}


def test_a_relative_out_is_made_absolute_for_the_checkpoints(tmp_path, monkeypatch):
  """orbax refuses relative checkpoint paths: the study's --out is resolved from the working directory."""
  monkeypatch.chdir(tmp_path)
  assert study.parse_args("study", ["phds"], ["--out=workdir/s"]).out == str(tmp_path / "workdir" / "s")
  assert study.parse_args("study", ["phds"], ["--scale=olmoe", "--zone=z", "--out=gs://b/s"]).out == "gs://b/s"
