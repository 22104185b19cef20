"""Claim (a), baseline robustness: the base model, never fine-tuned, evaluated at every k_ev <= k_pre.

  python -m experiments.baseline                      # tiny scale, seeds 0,1,2 (each seed: its own items)
  python -m experiments.baseline --seeds=0 --dry-run  # what it would run

Writes OUT/seed<s>/base/study_eval.json (accuracy per task and k, held-out loss, predictions); builds and
caches the study base first if needed (study.py). experiments/summarize.py tabulates it.
"""

if not __package__:  # run as a file: the package's imports need the repository root on the path
  raise SystemExit("run it from the repository root as a module: python -m experiments.baseline")

import sys

from experiments import study

if __name__ == "__main__":
  study.main(__doc__.split("\n\n")[0], ["baseline"], sys.argv[1:])
