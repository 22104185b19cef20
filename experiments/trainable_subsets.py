"""Claim (e): which parameters PHDS should tune as k drops. PHDS trained on attention only, experts only,
router only (train.trainable); "all" is the reference run `phds` (experiments/phds.py).

  python experiments/trainable_subsets.py            # tiny scale, seeds 0,1,2
  python experiments/trainable_subsets.py --groups=subsets,phds   # with the reference run

Writes OUT/seed<s>/phds_train_<subset>/ and their study_eval.json.
"""

import sys

import study

if __name__ == "__main__":
  study.main(__doc__.split("\n\n")[0], ["subsets"], sys.argv[1:])
