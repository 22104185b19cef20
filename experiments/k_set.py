"""Ablation of the k_train set: a narrow set (k_pre/2 .. k_pre, the kind the paper uses: {4..8} for OLMoE)
against the wide reference run `phds` (every k of the evaluation grid, down to 1).

  python experiments/k_set.py                        # tiny scale: phds_narrow_k ({2,3,4}), seeds 0,1,2

Writes OUT/seed<s>/phds_narrow_k/ and its study_eval.json.
"""

import sys

import study

if __name__ == "__main__":
  study.main(__doc__.split("\n\n")[0], ["kset"], sys.argv[1:])
