"""One figure per claim: each claim's paired comparisons (verdicts.Test) as differences with their bootstrap
95% intervals, one panel per endpoint, coloured by verdict, a line at 0 (no difference). RESULTS.md shows
them under its claim tables."""

from __future__ import annotations

import os
import re
from typing import Sequence

from experiments import verdicts

COLOURS = {"holds": "tab:green", "contradicted": "tab:red", "differs": "tab:purple", "inconclusive": "tab:grey"}


def claim_key(claim: str) -> str:
  """The figure a claim belongs to: "(b) PHDS minus ..." -> "b", "RoE (ii) ..." -> "roe_ii",
  "ablation: ..." -> "ablations"."""
  if claim.startswith("ablation"):
    return "ablations"
  match = re.match(r"(RoE )?\((\w+)\)", claim)
  if not match:
    return re.sub(r"\W+", "_", claim.lower()).strip("_")[:40]
  return ("roe_" if match.group(1) else "") + match.group(2)


def claim_figures(tests: Sequence[verdicts.Test], directory: str) -> dict[str, str]:
  """Writes claim_<key>.png per claim (several claims with one key share it, e.g. (b) against the oracles
  and against plain SFT); returns claim -> its figure's file name."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  by_key: dict[str, list[verdicts.Test]] = {}
  for t in tests:
    by_key.setdefault(claim_key(t.claim), []).append(t)
  written = {}
  for key, mine in by_key.items():
    endpoints = list(dict.fromkeys(t.endpoint for t in mine))
    rows = list(dict.fromkeys((t.claim, t.name) for t in mine))
    fig, axes = plt.subplots(1, len(endpoints), figsize=(4.2 * len(endpoints) + 2.5, 0.32 * len(rows) + 1.8),
                             squeeze=False, sharey=True)
    for ax, endpoint in zip(axes[0], endpoints):
      for y, (claim, name) in enumerate(rows):
        found = [t for t in mine if (t.claim, t.name, t.endpoint) == (claim, name, endpoint)]
        if not found:
          continue
        t = found[0]
        c, verdict = t.comparison, t.comparison.verdict(t.expected)
        ax.errorbar([c.mean], [y], xerr=[[c.mean - c.low], [c.high - c.mean]], fmt="o", markersize=4, capsize=3,
                    color=COLOURS.get(verdict, "black"))
      ax.axvline(0.0, color="black", linewidth=0.8)
      ax.set_title(endpoint + (" (> 0: first better)" if endpoint != "agreement" else " (> 0: first agrees more)"),
                   fontsize=9)
      ax.grid(axis="x", alpha=0.3)
    claims = list(dict.fromkeys(claim for claim, _ in rows))
    multi = len(claims) > 1
    axes[0][0].set_yticks(range(len(rows)))
    axes[0][0].set_yticklabels([(f"{claims.index(claim) + 1}: " if multi else "") + name for claim, name in rows],
                               fontsize=7)
    axes[0][0].invert_yaxis()
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=colour, label=verdict)
               for verdict, colour in COLOURS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(COLOURS), fontsize=7, frameon=False)
    title = "\n".join((f"{i + 1}: " if multi else "") + claim for i, claim in enumerate(claims))
    fig.suptitle(f"{title}\n(difference, bootstrap 95% interval; colour: verdict after Holm)", fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    name = f"claim_{key}.png"
    fig.savefig(os.path.join(directory, name), dpi=100)
    plt.close(fig)
    written.update((t.claim, name) for t in mine)
  return written
