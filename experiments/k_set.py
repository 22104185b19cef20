"""Ablation of the k_train set: a narrow set (k_pre/2 .. k_pre, the kind the paper uses: {4..8} for OLMoE)
against the wide reference run `phds` (every k of the evaluation grid, down to 1).

  python -m experiments.k_set                        # tiny scale: phds_narrow_k ({2,3,4}), seeds 0,1,2

Writes OUT/seed<s>/phds_narrow_k/ and its study_eval.json.
"""

if not __package__:  # run as a file: the package's imports need the repository root on the path
  raise SystemExit("run it from the repository root as a module: python -m experiments.k_set")

import sys

from experiments import study

if __name__ == "__main__":
  study.main(__doc__.split("\n\n")[0], ["kset"], sys.argv[1:])
