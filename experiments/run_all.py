"""The whole MoE-PHDS study: every driver's runs for every seed, then the summary (RESULTS.md and plots).

  python experiments/run_all.py --scale=tiny                  # 2 CPU cores; resumable: re-run to continue
  python experiments/run_all.py --scale=tiny --dry-run        # the runs, and how many are done
  python experiments/study.py --prepare_data --out=/tmp/study_data   # pod scale: the data files first
  python experiments/run_all.py --scale=olmoe --zone=us-west4-a --dry-run --plan=/ckpt/plan/plan.json \
      --out=gs://BUCKET/study --config.model_path=/models/OLMoE-1B-7B-0125

tiny: builds (once, cached) the study base, then fine-tunes and evaluates 13 runs per seed (study.runs) in
two worker processes and writes experiments/RESULTS.md with experiments/summarize.py. A finished run (its
study_eval.json) is skipped, an interrupted one resumes from its checkpoint. olmoe / qwen: prints (and
without --dry-run starts) one phds-launch command per run and seed, fine-tuning on OUT/data/seed<s>/.
"""

import sys

import study
import summarize

if __name__ == "__main__":
  argv = sys.argv[1:]
  args = study.parse_args(__doc__.split("\n\n")[0], study.GROUPS, argv)
  study.main(__doc__.split("\n\n")[0], study.GROUPS, argv)
  if args.scale == "tiny" and not args.dry_run:
    summarize.main(["--out", args.out, "--command", "python experiments/run_all.py " + " ".join(argv)])
