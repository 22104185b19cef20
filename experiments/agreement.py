"""Claim (c), cross-sparsity agreement, computed the way the paper states it, from the predictions the runs
stored (no new model evaluation): within the PHDS checkpoint (its prediction at k_ev vs at k_pre) against
within the oracle family (oracle_k at k_ev = k vs oracle_{k_pre} at k_pre), on the same items per seed.

  python -m experiments.agreement --out=workdir/study     # after experiments.phds and experiments.oracles

Prints one line per k_ev < k_pre: both agreements (mean +- std over seeds), their paired difference and the
relative gain of PHDS over the oracle family (the paper reports up to 22%).
"""

if not __package__:  # run as a file: the package's imports need the repository root on the path
  raise SystemExit("run it from the repository root as a module: python -m experiments.agreement")

import argparse
import os

from experiments import stats
from experiments import summarize
from experiments.settings import ROOT


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=os.path.join(ROOT, "workdir", "study"))
  args = parser.parse_args()
  runs = summarize.load_runs(args.out)
  missing = [name for name in ("phds", "oracle_k1") if name not in runs]
  if missing:
    raise SystemExit(f"{args.out} has no {missing} runs: run python -m experiments.phds and experiments.oracles "
                     "first")
  any_result = next(iter(runs["phds"].values()))
  k_pre = any_result["k_pre"]
  ks = sorted(int(k) for k in any_result["evaluation"] if int(k) < k_pre)
  print(f"{'k_ev':>4} {'within phds':>16} {'oracle family':>16} {'phds - oracles':>26} {'relative':>9}")
  for k in ks:
    phds = stats.per_seed(runs, "phds", stats.self_agreement_at(k, k_pre))
    oracles = stats.oracle_family_agreement(runs, k, k_pre)
    diff = stats.paired(phds, oracles)
    rel = {s: diff[s] / oracles[s] for s in diff if oracles[s] > 0}
    print(f"{k:>4} {stats.fmt(phds):>16} {stats.fmt(oracles):>16} {stats.fmt_diff(diff):>26} "
          f"{stats.spread(rel)[0]:>+8.1%}")


if __name__ == "__main__":
  main()
