"""The tiny study on this machine: the cached base, each seed's data, every run fine-tuned and evaluated
(in worker processes side by side), progress lines and a time estimate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

from experiments import data
from experiments.runs import Run, finetune_config
from experiments.progress import commit, say, write_json
from experiments.score import score_tasks
from experiments.settings import ROOT, Settings
from experiments.stats import mean_acc

Say = Callable[[str], None]


def worker_say(message: str):
  say(message, sys.stderr)


# ---- the base, evaluation, latency --------------------------------------------------------------------------


def build_base(settings: Settings, cache: str, progress: Say = say) -> tuple[str, str]:
  """(path of the cached synthetic base's best checkpoint, its tokenizer directory); trains it once."""
  from experiments import synthetic_base  # pylint: disable=g-import-not-at-top

  best = synthetic_base.build(settings, cache, progress)
  return best, synthetic_base.tokenizer_dir(best)


def base_lm_losses(run_dir: str) -> dict[str, Any]:
  """The base's held-out LM loss per k at the end of pre-training (its eval history's last row)."""
  from phds_jax.train import loop  # pylint: disable=g-import-not-at-top

  last = loop.read_history(os.path.join(run_dir, "eval_history.jsonl"))[-1]
  return {"step": last["step"], "val_loss": {key[len("val_loss_k"):]: value for key, value in last.items()
                                             if key.startswith("val_loss_k")}}


def evaluate_model(settings: Settings, cfg, params, tokenizer, data_dir: str, ks: Sequence[int], *,
                   batch_size: int = 64) -> dict[str, Any]:
  """Per k: accuracy per task (acc, acc_se, n, predictions) and the held-out loss of the evaluation items."""
  from phds_jax.eval import scoring  # pylint: disable=g-import-not-at-top

  tasks, batches = data.evaluation_tasks(settings, data_dir), data.heldout_batches(settings, tokenizer, data_dir)
  out = {}
  for k in ks:
    row = {"tasks": score_tasks(cfg, params, tokenizer, tasks, k, batch_size=batch_size)}
    row["heldout_nll"] = scoring.mean_nll(cfg, params, batches, k=k,
                                          max_loss_tokens=settings.heldout_loss_tokens)["nll"]
    out[str(k)] = row
  return out


def measure_latency(settings: Settings, cfg, params, ks: Sequence[int]) -> dict[str, Any]:
  """Decode latency per k (settings.latency: batch, prompt and decode lengths, repeats)."""
  from phds_jax.eval import latency  # pylint: disable=g-import-not-at-top

  return {str(k): latency.measure(cfg, params, k, **settings.latency) for k in ks}


# ---- running the tiny study ------------------------------------------------------------------------------


def prepare(settings: Settings, out: str, seeds: Sequence[int], cache: str,
            progress: Say = say) -> tuple[str, str]:
  """What every run shares, made once: the base (cached), each seed's data, the base's validation losses
  and the decode latency per k. Returns (the base's path, its tokenizer directory)."""
  from phds_jax import platforms  # pylint: disable=g-import-not-at-top
  from phds_jax.io.load import load  # pylint: disable=g-import-not-at-top

  platforms.use_cpu_without_accelerator()
  base_path, tokenizer_dir = build_base(settings, cache, progress)
  for seed in seeds:
    data.prepare_seed_data(settings, os.path.join(out, "data", f"seed{seed}"), seed)
  write_json(os.path.join(out, "base_lm.json"), base_lm_losses(os.path.dirname(base_path)))
  latency_file = os.path.join(out, "latency.json")
  if not os.path.isfile(latency_file):
    ks = settings.scales["tiny"].k_grid
    progress(f"measuring decode latency at k={list(ks)} (once: every checkpoint has the base's shapes)")
    write_json(latency_file, measure_latency(settings, *load(base_path), ks))
  return base_path, tokenizer_dir


def run_tiny(settings: Settings, out: str, seeds: Sequence[int], chosen: Sequence[Run], cache: str, *,
             worker: int = 0, workers: int = 1, progress: Say = say):
  """Fine-tunes and evaluates every (seed, run) of `chosen` not done yet; with workers > 1, this process
  takes every workers-th one, starting at `worker` (run_workers prepared what they share)."""
  from phds_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from phds_jax.io.load import load  # pylint: disable=g-import-not-at-top
  from phds_jax.train import loop  # pylint: disable=g-import-not-at-top

  scale = settings.scales["tiny"]
  start = time.time()
  os.makedirs(out, exist_ok=True)
  if workers == 1:
    base_path, tokenizer_dir = prepare(settings, out, seeds, cache, progress)
  else:
    base_path, tokenizer_dir = build_base(settings, cache, progress)
  tokenizer = pipeline.load_tokenizer(tokenizer_dir)
  todo = [(seed, run) for seed in seeds for run in chosen]
  mine = [(n, seed, run) for n, (seed, run) in enumerate(todo, 1) if (n - 1) % workers == worker]
  for number, seed, run in mine:
    data_dir = os.path.join(out, "data", f"seed{seed}")
    with open(os.path.join(data_dir, "split.json"), encoding="utf-8") as f:
      split = json.load(f)
    run_dir = os.path.join(out, f"seed{seed}", run.name)
    result_file = os.path.join(run_dir, "study_eval.json")
    tag = f"[{number}/{len(todo)}] seed {seed} {run.name}"
    if os.path.isfile(result_file):
      progress(f"{tag}: done before, skipped")
      continue
    t0 = time.time()
    summary = None
    if run.name == "base":
      progress(f"{tag}: evaluating at k={list(scale.k_grid)}")
      model_path = base_path
    else:
      progress(f"{tag}: fine-tuning ({run.group}; " + ", ".join(f"{k}={v}" for k, v in run.fields.items()) + ")")
      config = finetune_config(settings, run, base_path, tokenizer_dir, data_dir, seed, scale)
      summary = loop.train_and_evaluate(config, run_dir)
      model_path = os.path.join(run_dir, "best")
    cfg, params = load(model_path)
    result = {"run": run.name, "group": run.group, "seed": seed, "fields": run.fields, "claim": run.claim,
              "commit": commit(),
              "split": split, "k_pre": cfg.k_pre, "scale": scale.name,
              "evaluation": evaluate_model(settings, cfg, params, tokenizer, data_dir, scale.k_grid)}
    if summary:
      result.update(best_step=summary["best_step"], select_k=summary["select_k"],
                    selected_phase=summary["selected_phase"])
    result["seconds"] = round(time.time() - t0, 1)
    write_json(result_file, result)
    accs = " ".join(f"k{k}={mean_acc(r):.3f}" for k, r in result["evaluation"].items())
    progress(f"{tag}: accuracy {accs} ({result['seconds']:.0f} s; {(time.time() - start) / 60:.1f} min so far)")
  progress(f"{'worker ' + str(worker) + ': ' if workers > 1 else ''}finished {len(mine)} runs in "
           f"{(time.time() - start) / 60:.1f} min; outputs in {out}")


def run_workers(module: str, argv: Sequence[str], log_dir: str, workers: int, log_name: str = "worker"):
  """Runs `workers` copies of `python -m module ARGV --worker=i` from the repository root, each on its share;
  their full logs go to LOG_DIR/<log_name><i>.log, their progress lines (stderr) here. Stopping this process
  (Ctrl-C, SIGTERM) stops them; their finished runs stay."""
  signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # run the cleanup below
  start = time.time()
  os.makedirs(log_dir, exist_ok=True)
  say(f"{workers} worker processes (one XLA thread each); full logs in {log_dir}")
  procs = []
  for i in range(workers):
    log = open(os.path.join(log_dir, f"{log_name}{i}.log"), "a", encoding="utf-8")
    procs.append((subprocess.Popen([sys.executable, "-m", module, *argv, f"--worker={i}"], stdout=log, cwd=ROOT),
                  log))
  try:
    failed = [i for i, (p, _) in enumerate(procs) if p.wait() != 0]
  finally:
    for p, log in procs:
      if p.poll() is None:
        p.terminate()
        p.wait()
      log.close()
  if failed:
    raise SystemExit(f"worker(s) {failed} failed: see {log_dir}; re-run to resume")
  say(f"all workers finished in {(time.time() - start) / 60:.1f} min")


def estimate(settings: Settings, out: str, seeds: Sequence[int], chosen: Sequence[Run], workers: int,
             cache: str) -> str:
  """How much is done in `out` and, from the finished runs' own durations, about how long the rest takes."""
  from experiments import synthetic_base  # pylint: disable=g-import-not-at-top

  base = os.path.join(synthetic_base.base_dir(settings, cache), "run", "best")
  base_note = (f"the base is cached ({base})" if os.path.isdir(base) else
               "the base is not cached: building it takes about 9 min first (2 cores)")
  todo = [os.path.join(out, f"seed{seed}", run.name, "study_eval.json") for seed in seeds for run in chosen]
  done = [path for path in todo if os.path.isfile(path)]
  seconds = []
  for path in done:
    with open(path, encoding="utf-8") as f:
      seconds.append(json.load(f).get("seconds", 0.0))
  if not seconds:
    return (f"none of the {len(todo)} runs is done in {out}; each took about 115 s in a worker, two "
            f"workers on 2 CPU cores (2026-11-26); {base_note}")
  mean = sum(seconds) / len(seconds)
  left = (len(todo) - len(done)) * mean / workers / 60
  return (f"{len(done)} of {len(todo)} runs done in {out} ({mean:.0f} s each on average in a worker); "
          f"about {left:.0f} min left with {workers} worker(s); {base_note}")
