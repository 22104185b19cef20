"""Claims (b) and (c), the oracle family: one fine-tune per fixed k of the grid, hard top-k, the same data
and budget as PHDS, each selected by validation loss at its own k (phds.select_k = 0 on a one-k run).

  python -m experiments.oracles                      # tiny scale: oracle_k1 .. oracle_k4, seeds 0,1,2
  python -m experiments.oracles --scale=olmoe --dry-run --config.model_path=/models/OLMoE-1B-7B-0125

Writes OUT/seed<s>/oracle_k<k>/ (the run) and its study_eval.json; the base is evaluated too.
"""

if not __package__:  # run as a file: the package's imports need the repository root on the path
  raise SystemExit("run it from the repository root as a module: python -m experiments.oracles")

import sys

from experiments import study

if __name__ == "__main__":
  study.main(__doc__.split("\n\n")[0], ["oracles"], sys.argv[1:])
