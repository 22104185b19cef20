"""The MoE-PHDS study's command line (arXiv 2509.23012): `python -m experiments.study` from the repository
root. The drivers next to this file (baseline, oracles, phds, trainable_subsets, soft_mask, k_set,
run_all) are `main` with their own groups; summarize.py turns the outputs into RESULTS.md. What runs is
settings.py's `Settings` (data.py, runs.py; local.py at tiny scale, pod.py and collect.py at pod scale).

At `--scale=tiny` everything runs on this machine's CPU (in worker processes, `--workers`, default 2):
  1. the base (experiments/synthetic_base.py): an OLMoE-shaped model with 16 experts and k_pre = 4 trained
     at k_pre on the synthetic task families (phds_jax/data/synthetic.py), built once and cached under
     $PHDS_CACHE/study/; `python -m experiments.synthetic_base` reports how its accuracy depends on k;
  2. per seed, the data: each family's items split by the seed into evaluation items and fine-tuning items
     (no fact or context in both; the family "after" is never fine-tuned on). Validation (checkpoint
     selection) is a share of the fine-tuning items, never an evaluation item;
  3. per seed, every run of the chosen groups (runs.py): a fine-tune of the base with phds_jax.train,
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

if not __package__:  # run as a file: the package's imports need the repository root on the path
  raise SystemExit("run it from the repository root as a module: python -m experiments.study")

import argparse
import os
import sys
from typing import Sequence

from experiments import data
from experiments import local
from experiments import pod
from experiments.runs import GROUPS, select
from experiments.settings import DEFAULT, ROOT, Settings


def parse_args(description: str, default_groups: Sequence[str], argv=None, settings: Settings = DEFAULT):
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--scale", choices=sorted(settings.scales), default="tiny")
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (data split, k draws, order)")
  parser.add_argument("--out", default=os.path.join(ROOT, "workdir", "study"),
                      help="output directory (tiny: run directories; pod scale: a gs:// or shared path)")
  parser.add_argument("--groups", default=",".join(default_groups),
                      help=f"groups of runs among {list(GROUPS)}")
  parser.add_argument("--cache", default="", help="cache of the base and compiled programs ('' = $PHDS_CACHE or "
                      "~/.cache/phds_jax)")
  parser.add_argument("--dry-run", action="store_true", help="print the plan (runs, and commands) and exit")
  parser.add_argument("--plan", default="", help="pod scale: plan.json of the compile plan (time estimate)")
  parser.add_argument("--zone", default="", help="pod scale: the Cloud zone of the TPU slices")
  parser.add_argument("--stage", choices=pod.STAGES, default="finetune",
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
  if "://" not in args.out:  # checkpoints (orbax) need absolute paths; a relative --out is from here
    args.out = os.path.abspath(args.out)
  return args


def main(description: str, default_groups: Sequence[str], argv=None, settings: Settings = DEFAULT):
  args = parse_args(description, default_groups, argv, settings)
  scale = settings.scales[args.scale]
  chosen = select(scale, args.groups)
  if args.prepare_data:
    for seed in args.seeds:
      split = data.prepare_seed_data(settings, os.path.join(args.out, "data", f"seed{seed}"), seed)
      print(f"seed {seed}: {os.path.join(args.out, 'data', f'seed{seed}')} {split['tasks']}")
    return
  if args.scale != "tiny":
    pod.run_pod(settings, scale, chosen, args.seeds, args.out, args.zone, args.dry_run, args.plan, args.extra,
                args.stage)
    return
  if args.extra:
    raise SystemExit(f"unexpected arguments {args.extra}: extra main.py flags are for --scale=olmoe/qwen")
  from phds_jax.io import files  # pylint: disable=g-import-not-at-top

  cache = args.cache or files.cache_dir()
  if args.dry_run:
    print(f"study at scale tiny: base {settings.synthetic_base}; {len(chosen)} runs x {len(args.seeds)} seeds into {args.out}")
    for run in chosen:
      print(f"  {run.group:>8} {run.name:<20} claim {run.claim:<8} "
            + " ".join(f"{k}={v}" for k, v in run.fields.items()))
    print(local.estimate(settings, args.out, args.seeds, chosen, args.workers, cache))
    return
  # One XLA CPU thread: this model's small matmuls ran 1.3x faster on one thread than on two (0.40 vs 0.52 s
  # per training step of 1,024 tokens, 2-core machine); set before JAX starts. A user's XLA_FLAGS win.
  os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
  import jax  # pylint: disable=g-import-not-at-top

  # every run compiles the same few programs: keep them on disk across runs and re-runs
  jax.config.update("jax_compilation_cache_dir", os.path.join(cache, "study", "jax_compilation_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  if args.worker >= 0:
    local.run_tiny(settings, args.out, args.seeds, chosen, cache, worker=args.worker, workers=args.workers,
                   progress=local.worker_say)
  elif args.workers > 1:
    local.prepare(settings, args.out, args.seeds, cache)
    worker_argv = [f"--seeds={','.join(map(str, args.seeds))}", f"--out={args.out}", f"--cache={cache}",
                   f"--groups={','.join(args.groups)}", f"--workers={args.workers}"]
    local.run_workers("experiments.study", worker_argv, os.path.join(args.out, "logs"), args.workers)
  else:
    local.run_tiny(settings, args.out, args.seeds, chosen, cache)


if __name__ == "__main__":
  main(__doc__.split("\n\n")[0], GROUPS, sys.argv[1:])
