"""Roster of Experts (RoE, arXiv 2509.17238) on the tiny study's checkpoints: a training-free routing
ensemble at every declared k, on the base and on the PHDS checkpoint (issue 14's study).

  python -m experiments.roe                      # after experiments.phds (or run_all); ~25 min on 2 cores
  python -m experiments.roe --members=4 --taus=1.0 --seeds=0

For each seed, model (the base; OUT/seed<s>/phds/best) and k_ev in the study's grid, and each number of
members M (--members), tau is chosen among --taus (one temperature for every MoE layer, or one per layer:
"0:0:1:1") by mean accuracy over tasks on validation items only (ties: the first listed), then the ensemble
is scored on the study's evaluation items: accuracy, prediction and answer NLL per item, and the held-out
NLL. Scores use the algorithm generation and its latency use (pj.forward(roe=...)): each member's token
attends to the deterministic member's context (the clean cache) and its own position. The deterministic
model (M = 1) is the study's own evaluation (study_eval.json). Decode ms/token and FLOPs per token per
(k, M) are measured / counted once on the base (every checkpoint has its shapes). summarize.py adds the
results to RESULTS.md (section "Roster of Experts").

Validation items (our choice): per family and seed, up to --val_items items outside the evaluation groups,
first new ones no run fine-tuned on, then fine-tuning items (arith and after have no new ones left).
Writes OUT/roe/seed<s>/<model>.json (a finished one is skipped: a re-run resumes) and OUT/roe/latency.json.
"""

from __future__ import annotations

if not __package__:  # run as a file: the package's imports need the repository root on the path
  raise SystemExit("run it from the repository root as a module: python -m experiments.roe")

import argparse
import json
import os
import random
import sys
import time
from typing import Any, Sequence

from experiments import data
from experiments import local
from experiments import stats
from experiments.local import say, write_json
from experiments.score import score_tasks
from experiments.settings import DEFAULT, ROOT, Settings

MODELS = ("base", "phds")


def validation_items(settings: Settings, seed: int, per_task: int) -> dict[str, list[dict[str, Any]]]:
  """family -> up to `per_task` items of groups outside the seed's evaluation split: new ones first (never
  fine-tuned on), then fine-tuning items where the family has no new ones left (arith, after)."""
  from phds_jax.data import synthetic  # pylint: disable=g-import-not-at-top

  out = {}
  for family, (evaluation, fine_tune) in data.seed_items(settings, seed).items():
    used = {it["group"] for it in evaluation + fine_tune}
    unseen = synthetic.items(family, per_task, seed + 20_000, exclude_groups=used)
    seen = list(fine_tune)
    random.Random(seed + 4).shuffle(seen)
    out[family] = [synthetic.as_multiple_choice(it) for it in (unseen + seen)[:per_task]]
  return out


def mean_accuracy(scored: dict[str, dict[str, Any]]) -> float:
  """Mean accuracy over tasks of score_tasks' output."""
  return stats.mean_acc({"tasks": scored})


def evaluate_model(settings: Settings, cfg, params, tokenizer, data_dir: str, validation, ks, members, taus,
                   seed: int, progress, done=None, save=None):
  """{k: {M: {"tau", "validation": {tau: acc}, "tasks", "heldout_nll"}}} for one checkpoint; `done` holds
  the ks finished before (kept), save(partial result) is called after each k."""
  from phds_jax.eval import scoring as evaluate  # pylint: disable=g-import-not-at-top
  import phds_jax as pj  # pylint: disable=g-import-not-at-top

  tasks = data.evaluation_tasks(settings, data_dir)
  batches = data.heldout_batches(settings, tokenizer, data_dir)
  out = dict(done or {})
  for k in ks:
    if str(k) in out:
      progress(f"  k={k}: done before, kept")
      continue
    out[str(k)] = {}
    for m in members:
      val = {tau: mean_accuracy(score_tasks(cfg, params, tokenizer, validation, k,
                                            roe=pj.RoE(members=m, tau=tau, seed=seed))) for tau in taus}
      tau = max(taus, key=lambda t: (val[t], -taus.index(t)))
      roe = pj.RoE(members=m, tau=tau, seed=seed + 1000)  # other routings than validation's
      scored = score_tasks(cfg, params, tokenizer, tasks, k, roe=roe)
      nll = evaluate.mean_nll(cfg, params, batches, k=k, max_loss_tokens=settings.heldout_loss_tokens,
                              roe=roe)["nll"]
      out[str(k)][str(m)] = {"tau": tau_name(tau), "validation": {tau_name(t): v for t, v in val.items()},
                             "tasks": scored, "heldout_nll": nll}
      progress(f"  k={k} M={m}: tau={tau_name(tau)} (validation "
               + ", ".join(f"{tau_name(t)}: {v:.3f}" for t, v in val.items())
          + f"), accuracy {mean_accuracy(scored):.3f}, held-out NLL {nll:.4f}")
    if save:
      save(out)
  return out


def measure_latency(settings: Settings, cfg, params, ks, members) -> dict[str, dict[str, Any]]:
  """{k: {M: latency.measure + "flops_per_token"}}, M = 1 included; tau = 1 (tau changes which experts, not
  the cost). FLOPs per decoded token: M times one token's forward at top-k over the mean context of the
  timed decode (plan/cost.py's model: every matmul, k experts, attention)."""
  from phds_jax.eval import latency  # pylint: disable=g-import-not-at-top
  from phds_jax.plan.cost import forward_flops_per_token  # pylint: disable=g-import-not-at-top
  import phds_jax as pj  # pylint: disable=g-import-not-at-top

  timing = settings.latency
  context = timing["prompt_len"] + timing["decode_tokens"] / 2
  return {str(k): {str(m): {**latency.measure(cfg, params, k, **timing,
                                              roe=pj.RoE(members=m, tau=1.0) if m > 1 else None),
                            "flops_per_token": m * forward_flops_per_token(cfg, k, context)}
                   for m in (1, *members)} for k in ks}


def tau_name(tau) -> str:
  """0.5 -> "0.5"; a temperature per MoE layer (0.0, 0.0, 1.0, 1.0) -> "0:0:1:1"."""
  return ":".join(f"{t:g}" for t in tau) if isinstance(tau, tuple) else f"{tau:g}"


def parse_taus(text: str) -> list:
  """"0.25,0.5,0:0:1:1" -> [0.25, 0.5, (0.0, 0.0, 1.0, 1.0)]: a float, or a tuple with one per MoE layer."""
  out = []
  for part in (p.strip() for p in text.split(",") if p.strip()):
    values = tuple(float(v) for v in part.split(":"))
    out.append(values if len(values) > 1 else values[0])
  return out


def jobs(out: str, seeds: Sequence[int]) -> list[tuple[int, str, str]]:
  """(seed, model, result file) of every job, finished or not."""
  return [(seed, model, os.path.join(out, "roe", f"seed{seed}", f"{model}.json")) for seed in seeds for model in MODELS]


def run_jobs(settings: Settings, args, worker: int, workers: int, progress=say):
  """Every (seed, model) job of this worker not finished before; an interrupted one keeps its finished ks."""
  from phds_jax.data import pipeline as data_lib  # pylint: disable=g-import-not-at-top
  from phds_jax.io.load import load  # pylint: disable=g-import-not-at-top

  base_path, tokenizer_dir = local.build_base(settings, args.cache, progress)
  tokenizer = data_lib.load_tokenizer(tokenizer_dir)
  ks = settings.scales["tiny"].k_grid
  todo = jobs(args.out, args.seeds)
  for number, (seed, model, result_file) in enumerate(todo, 1):
    if (number - 1) % workers != worker:
      continue
    if os.path.isfile(result_file):
      progress(f"[{number}/{len(todo)}] seed {seed} {model}: done before, skipped")
      continue
    t0 = time.time()
    progress(f"[{number}/{len(todo)}] seed {seed} {model}: members {args.members}, taus "
             f"{[tau_name(t) for t in args.taus]}, k={list(ks)}")
    path = base_path if model == "base" else os.path.join(args.out, f"seed{seed}", model, "best")
    cfg, params = load(path)
    header = {"model": model, "seed": seed, "members": args.members, "taus": [tau_name(t) for t in args.taus],
              "val_items": args.val_items}
    partial_file = result_file + ".partial_ks"  # finished ks of an interrupted job (same settings only)
    done = {}
    if os.path.isfile(partial_file):
      with open(partial_file, encoding="utf-8") as f:
        partial = json.load(f)
      done = partial["evaluation"] if {key: partial[key] for key in header} == header else {}
    evaluation = evaluate_model(settings, cfg, params, tokenizer, os.path.join(args.out, "data", f"seed{seed}"),
                                validation_items(settings, seed, args.val_items), ks, args.members,
                                args.taus, seed, progress, done,
                                lambda ev: write_json(partial_file, {**header, "evaluation": ev}))
    write_json(result_file, {**header, "evaluation": evaluation, "seconds": round(time.time() - t0, 1)})
    os.remove(partial_file)
    progress(f"[{number}/{len(todo)}] seed {seed} {model}: done in {time.time() - t0:.0f} s")


def _noisy(tau) -> bool:
  """A usable tau: a float > 0, or one per MoE layer, each >= 0 and one > 0."""
  values = tau if isinstance(tau, tuple) else (tau,)
  return min(values) >= 0 and max(values) > 0


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=os.path.join(ROOT, "workdir", "study"),
                      help="the study's output directory")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--members", default="2,4", help="numbers of routing members (each >= 2)")
  parser.add_argument("--taus", default="0.25,0.5,1.0,0:0:1:1,1:1:0:0",
                      help="Gumbel temperatures tau is chosen among: one for every MoE layer (> 0), or one per "
                           "MoE layer joined by ':' (>= 0, one > 0)")
  parser.add_argument("--val_items", type=int, default=20, help="validation items per task")
  parser.add_argument("--cache", default="", help="the study's cache ('' = $PHDS_CACHE or ~/.cache/phds_jax)")
  parser.add_argument("--workers", type=int, default=2, help="processes side by side, one XLA thread each")
  parser.add_argument("--worker", type=int, default=-1, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  try:
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.members = [int(m) for m in args.members.split(",") if m.strip()]
    args.taus = parse_taus(args.taus)
  except ValueError as e:
    parser.error(f"--seeds / --members / --taus take numbers separated by commas ({e})")
  if not args.seeds or not args.members or any(m < 2 for m in args.members):
    parser.error(f"--members={args.members}: give numbers >= 2 (M = 1 is the study's own evaluation)")
  if not args.taus or not all(_noisy(t) for t in args.taus):
    parser.error(f"--taus={args.taus}: give temperatures > 0 (per layer: >= 0, one of them > 0)")
  args.out = os.path.abspath(args.out)  # checkpoints (orbax) load from absolute paths
  missing = [os.path.join(args.out, f"seed{s}", "phds", "best") for s in args.seeds
             if not os.path.isdir(os.path.join(args.out, f"seed{s}", "phds", "best"))]
  if missing:
    parser.error(f"no PHDS checkpoint {missing[0]}: run python -m experiments.phds (or experiments.run_all) first")
  return args


def main(argv, settings: Settings = DEFAULT):
  args = parse_args(argv)
  os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
  import jax  # pylint: disable=g-import-not-at-top

  from phds_jax import platforms  # pylint: disable=g-import-not-at-top
  from phds_jax.io import files  # pylint: disable=g-import-not-at-top

  platforms.use_cpu_without_accelerator()
  args.cache = args.cache or files.cache_dir()
  jax.config.update("jax_compilation_cache_dir", os.path.join(args.cache, "study", "jax_compilation_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  if args.worker >= 0:
    run_jobs(settings, args, args.worker, args.workers, local.worker_say)
    return
  start = time.time()
  latency_file = os.path.join(args.out, "roe", "latency.json")
  if not os.path.isfile(latency_file):
    from phds_jax.io.load import load  # pylint: disable=g-import-not-at-top

    base_path, _ = local.build_base(settings, args.cache)
    say(f"measuring decode latency per k and members {[1, *args.members]} on the base (once)")
    write_json(latency_file, measure_latency(settings, *load(base_path), settings.scales["tiny"].k_grid,
                                             args.members))
  if args.workers == 1:
    run_jobs(settings, args, 0, 1)
  else:
    local.run_workers("experiments.roe", [*argv, f"--workers={args.workers}", f"--cache={args.cache}"],
                      os.path.join(args.out, "logs"), args.workers, log_name="roe_worker")
  say(f"RoE study finished in {(time.time() - start) / 60:.1f} min; run python -m experiments.summarize")


if __name__ == "__main__":
  main(sys.argv[1:])
