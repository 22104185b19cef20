"""The whole MoE-PHDS study: every driver's runs for every seed, then the summary (RESULTS.md and plots).

  python experiments/run_all.py --scale=tiny                  # 2 CPU cores; resumable: re-run to continue
  python experiments/run_all.py --scale=tiny --dry-run        # the runs it would do
  python experiments/run_all.py --scale=olmoe --dry-run --plan=/ckpt/plan/plan.json \
      --config.model_path=/models/OLMoE-1B-7B-0125 --config.data.train_files='/data/sft/*.jsonl'

tiny: builds (once, cached) the study base, then fine-tunes and evaluates 13 runs per seed (study.RUNS) in
this process and writes experiments/RESULTS.md with experiments/summarize.py. A finished run (its
study_eval.json) is skipped, an interrupted one resumes from its checkpoint. olmoe / qwen: prints (and
without --dry-run starts) one phds-launch command per run and seed.
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
