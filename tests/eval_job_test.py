"""Evaluation metrics on hand-computable cases, agreement, the eval command end to end, bad inputs."""

import json
import math
import os

import jax
import numpy as np
import pytest

import phds_jax as pj
from phds_jax.data import pipeline as data
from phds_jax import errors
from phds_jax.eval import job as eval_job
from phds_jax.eval import scoring as evaluate
from phds_jax import main
from conftest import build_hf_model, load_config, write_toy_sft, write_toy_tokenizer



class _WordTokenizer:
  """One token per character 'a'..'j' (ids 3..12)."""

  def encode(self, text, add_special_tokens=False):
    return [ord(ch) - ord("a") + 3 for ch in text.replace(" ", "")]


def test_uniform_model_log_likelihoods_are_known():
  cfg = pj.preset("tiny-olmoe")
  zero = jax.tree.map(np.zeros_like, pj.init_params(cfg, jax.random.key(0)))  # logits all 0: uniform
  pairs = [([3, 4], [5]), ([3], [4, 5, 6])]
  scores = evaluate.continuation_logprobs(cfg, zero, pairs, k=2)
  np.testing.assert_allclose(scores, [-math.log(cfg.vocab_size), -3 * math.log(cfg.vocab_size)], rtol=1e-6)
  # " cd": 2 tokens, 3 characters (-2 log V, -2/3 log V per char); "f": 1 token, 1 character (-log V)
  items = [{"context": "ab", "choices": [" cd", "f"], "answer": 1},
           {"context": "ab", "choices": [" cd", "f"], "answer": 0}]
  result = evaluate.multiple_choice(cfg, zero, _WordTokenizer(), items, k=1)
  assert result["predictions"] == [1, 1] and result["acc"] == 0.5  # fewer tokens: higher likelihood
  assert result["predictions_norm"] == [0, 0] and result["acc_norm"] == 0.5  # higher per character


def test_agreement_of_a_model_with_itself_is_one(hf_dirs, tmp_path):
  cfg, params = pj.hf.load_pretrained(hf_dirs["olmoe_gqa_clip_norm"][0])
  tokenizer = data.load_tokenizer(write_toy_tokenizer(tmp_path / "tok"))
  rows = data.pack(data.read_sft(write_toy_sft(tmp_path / "s.jsonl", n=20), tokenizer), 64)
  batches = data.eval_batches(rows, 4)
  same = evaluate.next_token_agreement(cfg, params, batches, k=2, reference_k=2)
  assert same["top1_agreement"] == 1.0 and abs(same["mean_kl"]) < 1e-6
  other = evaluate.next_token_agreement(cfg, params, batches, k=1, reference_k=8)
  assert other["top1_agreement"] < 1.0 and other["mean_kl"] > 0
  # SFT rows train on a few answer tokens: projecting only those to the vocabulary gives the same numbers
  projected = evaluate.projected_positions(batches)
  assert 0 < projected < 64 and projected % 16 == 0
  assert projected >= max(int((b["weights"] > 0).sum(axis=1).max()) for b in batches)
  assert evaluate.next_token_agreement(cfg, params, batches, k=1, reference_k=8,
                                       max_loss_tokens=projected) == pytest.approx(other, rel=1e-5)
  text = data.pack(data.chunk_examples([data.Example(list(range(3, 40)), [True] * 37)] * 4, 16), 16)
  assert evaluate.projected_positions(data.eval_batches(text, 2)) == 0  # text: every position is trained


def test_k_grid_has_one_policy_for_every_mode():
  from phds_jax.eval import settings

  assert settings.k_grid("4,1,2,4", 8) == [1, 2, 4]
  with pytest.raises(ValueError, match=r"eval.k_values='1,9': k=9 is outside \[1, 8\] \(the model has 8 experts\)"):
    settings.k_grid("1,9", 8)
  with pytest.raises(ValueError, match=r"phds.k_values='0,2': k=0 is outside"):
    settings.k_grid("0,2", 8, field="phds.k_values")


def test_too_long_items_are_cut_or_refused(caplog):
  cfg = pj.preset("tiny-olmoe").replace(max_position_embeddings=16)
  params = pj.init_params(cfg, jax.random.key(0))
  pairs = [(list(range(3, 30)), [5, 6])]
  cut = evaluate.continuation_logprobs(cfg, params, pairs, k=2)
  assert "dropping context from the left" in caplog.text
  np.testing.assert_allclose(cut, evaluate.continuation_logprobs(cfg, params, [(list(range(3, 30))[-14:], [5, 6])],
                                                                 k=2), rtol=1e-6)
  with pytest.raises(ValueError, match=r"pair 0: 29 tokens exceed max_position_embeddings=16"):
    evaluate.continuation_logprobs(cfg, params, pairs, k=2, truncate=False)


def test_unknown_olmo_task_and_bad_task_files(tmp_path):
  from phds_jax.data import olmo_tasks

  with pytest.raises(evaluate.TaskFormatError, match="write it as task:variant"):
    olmo_tasks.load_task("arc_easy")
  (tmp_path / "t.jsonl").write_text('{"question": "x"}\n')
  with pytest.raises(evaluate.TaskFormatError, match=r"t\.jsonl:1: .*context"):
    evaluate.read_multiple_choice(str(tmp_path / "t.jsonl"))


@pytest.mark.slow
def test_eval_command_end_to_end(tmp_path, capsys):
  model_dir = tmp_path / "model"
  build_hf_model("qwen_sparse_step").save_pretrained(model_dir)
  write_toy_tokenizer(model_dir)  # the eval job loads the tokenizer from the model directory
  items = tmp_path / "items.jsonl"
  items.write_text("".join(json.dumps({"context": f"say first of : w{i} w{i + 1}", "choices": [f" w{i}", f" w{i + 1}"],
                                       "answer": 0}) + "\n" for i in range(10)))
  sft = write_toy_sft(tmp_path / "sft.jsonl", n=30)
  work = tmp_path / "out"
  config = load_config("eval", "1,2", **{
      "model_path": str(model_dir), "eval.label": "phds",
      "eval.task_files": str(items), "eval.sft_files": sft, "data.seq_len": 64, "eval.latency.prompt_len": 16,
      "eval.latency.decode_tokens": 4, "eval.latency.repeats": 1})
  main.run(config, str(work))
  out = json.load(open(work / "eval_results.json"))
  rows = out["results"]["phds"]
  assert sorted(rows) == ["1", "2"]
  ref = rows[str(2)]
  assert ref["agreement_mean"] == 1.0 and ref["top1_agreement"] == 1.0
  for k in ("1", "2"):
    assert {"acc_mean", "nll", "ppl", "latency", "flops_per_token"} <= set(rows[k])
    assert rows[k]["latency"]["decode_ms_per_token"] >= 0
  assert os.path.getsize(work / "accuracy_vs_latency.png") > 1000
  cfg, params = pj.load(str(model_dir))  # the job's numbers are those of scoring the model directly
  tokenizer = data.load_tokenizer(str(model_dir))
  direct_items = evaluate.read_multiple_choice(str(items))
  for k in ("1", "2"):
    direct = evaluate.multiple_choice(cfg, params, tokenizer, direct_items, k=int(k))
    assert rows[k]["tasks"]["items.jsonl"]["acc"] == pytest.approx(direct["acc"])
    assert rows[k]["tasks"]["items.jsonl"]["acc_norm"] == pytest.approx(direct["acc_norm"])
  task = rows["1"]["tasks"]["items.jsonl"]
  assert task["n"] == rows["1"]["items"] == 10
  p = task["acc"]
  assert task["acc_se"] == pytest.approx(math.sqrt(p * (1 - p) / 9))  # sample standard error over 10 items
  assert rows["1"]["acc_mean_se"] == pytest.approx(task["acc_se"])  # one task
  printed = capsys.readouterr().out
  assert "decode ms/tok" in printed and "(10 multiple-choice items)" in printed and "+-se" in printed
  assert "MFLOP/tok" in printed


def test_agreement_across_checkpoints_is_measured_against_one_anchor(tmp_path, capsys):
  """eval.agreement_with=b: every checkpoint's multiple-choice agreement at each k is with b's predictions at
  b's reference k (how claim (c) compares an oracle family); checked against the predictions themselves."""
  dirs = {}
  for label, seed in (("a", 0), ("b", 1)):
    dirs[label] = tmp_path / label
    build_hf_model("qwen_sparse_step", seed=seed).save_pretrained(dirs[label])
    write_toy_tokenizer(dirs[label])
  items = tmp_path / "items.jsonl"
  items.write_text("".join(json.dumps({"context": f"pick : w{i}", "choices": [f" w{i}", f" w{i + 3}", f" w{i + 5}"],
                                       "answer": i % 3}) + "\n" for i in range(24)))
  config = load_config("eval", "1,2", **{"model_path": str(dirs["a"]), "eval.label": "a",
                                         "eval.compare": f"b={dirs['b']}", "eval.task_files": str(items),
                                         "eval.agreement_with": "b", "eval.latency.enabled": False,
                                         "eval.roe": "3:1.0"})  # one routing-ensemble curve per checkpoint
  out = main.run(config, str(tmp_path / "out"))
  assert list(out) == ["a", "a RoE M=3 tau=1", "b", "b RoE M=3 tau=1"]
  for label in "ab":  # the ensemble: 3x the FLOPs; agreement with the anchor's deterministic predictions
    ensemble = out[f"{label} RoE M=3 tau=1"]
    for k in (1, 2):
      assert ensemble[k]["flops_per_token"] == pytest.approx(3 * out[label][k]["flops_per_token"])
      task = ensemble[k]["tasks"]["items.jsonl"]
      assert task["agreement"] == pytest.approx(np.mean(np.array(task["predictions"]) == np.array(
          out["b"][2]["tasks"]["items.jsonl"]["predictions"])))
  assert any(out[f"{label} RoE M=3 tau=1"][k]["tasks"]["items.jsonl"]["predictions"] !=
             out[label][k]["tasks"]["items.jsonl"]["predictions"] for label in "ab" for k in (1, 2))
  assert os.path.getsize(tmp_path / "out" / "accuracy_vs_flops.png") > 1000
  tokenizer = data.load_tokenizer(str(dirs["a"]))
  task = evaluate.read_multiple_choice(str(items))
  predicted = {(label, k): np.array(evaluate.multiple_choice(*pj.load(str(dirs[label])), tokenizer, task, k=k)[
      "predictions"]) for label in "ab" for k in (1, 2)}
  for label in "ab":
    for k in (1, 2):
      expected = float(np.mean(predicted[(label, k)] == predicted[("b", 2)]))
      assert out[label][k]["tasks"]["items.jsonl"]["agreement"] == pytest.approx(expected)
  assert out["b"][2]["agreement_mean"] == 1.0 and out["a"][2]["agreement_mean"] < 1.0
  assert json.load(open(tmp_path / "out" / "eval_results.json"))["agreement_with"] == {"label": "b", "k": 2}
  printed = capsys.readouterr().out
  assert "agree@b:k2" in printed and "evaluating a RoE M=3 tau=1" in printed
  config.eval.roe = "1:0.5"
  with pytest.raises(errors.ConfigProblems, match="eval.roe: entry '1:0.5' must be members:tau"):
    main.run(config, str(tmp_path / "out2"))
  config.eval.roe, config.eval.agreement_with = "", "c"
  with pytest.raises(errors.ConfigProblems, match="eval.agreement_with='c' is not a checkpoint label"):
    main.run(config, str(tmp_path / "out2"))


def test_means_over_tasks_and_the_per_task_table():
  per_task = {"a": {"acc": 0.5, "acc_se": 0.3, "agreement": 1.0, "agreement_se": 0.0, "n": 4},
              "b": {"acc": 1.0, "acc_se": 0.4, "agreement": 0.5, "agreement_se": 0.1, "n": 6}}
  means = eval_job._task_means(per_task)
  assert means == pytest.approx({"items": 10, "acc_mean": 0.75, "acc_mean_se": 0.25, "agreement_mean": 0.75,
                                 "agreement_mean_se": math.sqrt(0.01) / 2})
  table = eval_job.format_table("m", {2: {"tasks": per_task, **means}}, reference_k=2).splitlines()
  assert table[0] == "m (10 multiple-choice items)"
  assert table[-2].split() == ["2", "a", "4", "0.5000", "0.3000", "1.0000", "0.0000"]
  assert table[-1].split() == ["2", "b", "6", "1.0000", "0.4000", "0.5000", "0.1000"]
  assert evaluate.standard_error([1, 0, 1, 0]) == pytest.approx(math.sqrt(1 / 3) / 2)
  assert evaluate.standard_error([1]) == 0.0


def test_olmo_suite_tasks_load_from_the_wheel():
  from phds_jax.data import olmo_tasks

  arc = olmo_tasks.load_task("arc_easy:rc_0shot")
  assert len(arc) > 500 and all(0 <= it["answer"] < len(it["choices"]) for it in arc)
  assert arc[0]["context"].endswith("Answer:") and arc[0]["choices"][0].startswith(" ")
  # OLMES's unconditioned requests (doc_id + 1,000,000, context "Answer:") are not items of their own
  piqa = olmo_tasks.load_task("piqa:val_rc_5shot")
  assert len(piqa) == 1838 and not any(it["context"].strip() == "Answer:" for it in piqa)  # PIQA's validation set
  boolq = olmo_tasks.load_task("boolq:mc_5shot", limit=4)
  assert len(boolq) == 4 and boolq[0]["choices"] == [" A", " B"]
  mmlu = olmo_tasks.load_task("mmlu:rc_validation")
  assert len(mmlu) == 1531 and len(mmlu[0]["choices"]) == 4
  assert olmo_tasks.load_task("mmlu:mc_dev", limit=1)[0]["choices"] == [" A", " B", " C", " D"]
  with pytest.raises(evaluate.TaskFormatError, match=r"variants of arc_easy: \['mc_5shot'"):
    olmo_tasks.load_task("arc_easy:rc_9shot")
  with pytest.raises(evaluate.TaskFormatError, match="mmlu:rc_<split>"):
    olmo_tasks.load_task("mmlu:xx_test")


def test_unknown_task_file_format(tmp_path):
  import ml_collections

  (tmp_path / "items.csv").write_text("context,choices,answer\n")
  config = ml_collections.ConfigDict({"eval": {"tasks": "", "task_files": str(tmp_path / "items.csv"), "limit": 0}})
  with pytest.raises(evaluate.TaskFormatError, match=r"items\.csv: unknown task file format"):
    eval_job._tasks(config)
