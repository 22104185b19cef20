"""The whole MoE-PHDS study: every driver's runs for every seed, then the summary (RESULTS.md and plots).

  python -m experiments.run_all --scale=tiny                  # 2 CPU cores; resumable: re-run to continue
  python -m experiments.run_all --scale=tiny --dry-run        # the runs, and how many are done
  python -m experiments.study --prepare_data --out=/tmp/study_data   # pod scale: the data files first
  python -m experiments.run_all --scale=olmoe --zone=us-west4-a --dry-run --plan=/ckpt/plan/plan.json \
      --out=gs://BUCKET/study --config.model_path=/models/OLMoE-1B-7B-0125
  python -m experiments.run_all --scale=olmoe --zone=us-west4-a --stage=evaluate --out=gs://BUCKET/study \
      --config.model_path=/models/OLMoE-1B-7B-0125       # when the fine-tunes are done
  gsutil -m cp -r gs://BUCKET/study /tmp/study && python -m experiments.run_all --scale=olmoe \
      --stage=collect --out=/tmp/study                    # writes /tmp/study/RESULTS.md

tiny: builds (once, cached) the study base, then fine-tunes and evaluates 17 runs per seed (runs.py) in
two worker processes, scores the Roster-of-Experts ensembles of the base and PHDS (roe.py), and writes
experiments/RESULTS.md (+ .json, _seeds.json, PNGs) with experiments/summarize.py, checking the
hand-written RESULTS_reading.md against the new numbers (reading.py). A finished run (its
study_eval.json) is skipped, an interrupted one resumes from its checkpoint. olmoe / qwen: prints (and
without --dry-run starts) one phds-launch command per run and seed, fine-tuning on OUT/data/seed<s>/
(--stage=finetune), then evaluating each selected checkpoint and the base (--stage=evaluate); --stage=collect
turns the evaluations into study_eval.json files and writes OUT/RESULTS.md with summarize.py.
"""

if not __package__:  # run as a file: the package's imports need the repository root on the path
  raise SystemExit("run it from the repository root as a module: python -m experiments.run_all")

import sys

from experiments import roe
from experiments import study
from experiments import summarize
from experiments.runs import GROUPS

if __name__ == "__main__":
  argv = sys.argv[1:]
  args = study.parse_args(__doc__.split("\n\n")[0], GROUPS, argv)
  study.main(__doc__.split("\n\n")[0], GROUPS, argv)
  command = ["--command", "python -m experiments.run_all " + " ".join(argv)]
  if args.scale == "tiny" and not args.dry_run:
    if "phds" in args.groups:  # RoE ensembles the base and the PHDS checkpoints
      roe.main([f"--out={args.out}", "--seeds=" + ",".join(str(s) for s in args.seeds),
                f"--workers={args.workers}",
                *([f"--cache={args.cache}"] if args.cache else [])])
    summarize.main(["--out", args.out, *command])
  elif args.stage == "collect":
    summarize.main(["--out", args.out, "--results", f"{args.out}/RESULTS.md", *command])
