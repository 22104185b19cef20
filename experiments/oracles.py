"""Claims (b) and (c), the oracle family: one fine-tune per fixed k of the grid, hard top-k, the same data
and budget as PHDS, each selected by validation loss at its own k (phds.select_k = 0 on a one-k run).

  python experiments/oracles.py                      # tiny scale: oracle_k1 .. oracle_k4, seeds 0,1,2
  python experiments/oracles.py --scale=olmoe --dry-run --config.model_path=/models/OLMoE-1B-7B-0125

Writes OUT/seed<s>/oracle_k<k>/ (the run) and its study_eval.json; the base is evaluated too.
"""

import sys

import study

if __name__ == "__main__":
  study.main(__doc__.split("\n\n")[0], ["oracles"], sys.argv[1:])
