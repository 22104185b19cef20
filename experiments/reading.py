"""The hand-written reading beside RESULTS.md, checked against the numbers each summary writes.

A reading lists the numbers it quotes under a heading "## Numbers this reading quotes", one per line:

  - claim | (b) PHDS minus the oracle fine-tuned at k | k=1 | accuracy | mean: -0.026
  - claim | (b) PHDS minus the oracle fine-tuned at k | k=1 | accuracy | verdict: contradicted
  - table | accuracy | phds | 1: 0.557

("claim": a row of RESULTS.json's "claims" by claim, compared, endpoint, then a field of it; "table": the
mean over seeds of RESULTS.json's accuracy / heldout_nll / agreement table by method and k; RoE's tables
as "table | roe.accuracy | phds M=2 | 1: ...".) A number matches when RESULTS.json's value rounds to it at
the quoted number of decimals. `check` lists what no longer matches; `flag` writes (or removes) a banner
at the top of the reading saying so.
"""

from __future__ import annotations

import os
import re
from typing import Any, Optional

HEADING = "## Numbers this reading quotes"
BANNER = "> **Out of date**"
_LINE = re.compile(r"^- (claim|table) \| (.+): (\S+)\s*$")


def quotes(text: str) -> list[tuple[str, list[str], str]]:
  """(kind, path parts, quoted value) for each line of the reading's quoted-numbers section."""
  if HEADING not in text:
    return []
  out = []
  for line in text.split(HEADING, 1)[1].splitlines():
    if line.startswith("## "):
      break
    match = _LINE.match(line.strip())
    if match:
      out.append((match.group(1), [p.strip() for p in match.group(2).split("|")], match.group(3)))
  return out


def lookup(data: dict[str, Any], kind: str, parts: list[str]) -> Optional[Any]:
  """The value a quote refers to in RESULTS.json's data, or None when it is not there."""
  if kind == "claim" and len(parts) == 4:
    claim, name, endpoint, field = parts
    rows = [c for c in data.get("claims", []) if (c["claim"], c["name"], c["endpoint"]) == (claim, name, endpoint)]
    return rows[0].get(field) if rows else None
  if kind == "table" and len(parts) == 3:
    table, method, k = parts
    node: Any = data
    for key in table.split("."):
      node = node.get(key, {}) if isinstance(node, dict) else {}
    return node.get(method, {}).get(k, {}).get("mean")
  return None


def _matches(actual: Any, quoted: str) -> bool:
  if isinstance(actual, (int, float)) and re.fullmatch(r"[-+]?\d+(\.\d+)?", quoted):
    decimals = len(quoted.split(".")[1]) if "." in quoted else 0
    return round(float(actual), decimals) == float(quoted)
  return str(actual) == quoted


def check(text: str, data: dict[str, Any]) -> tuple[int, list[str]]:
  """(how many numbers the reading quotes, a line per one that no longer matches `data`)."""
  found = quotes(text)
  stale = []
  for kind, parts, quoted in found:
    actual = lookup(data, kind, parts)
    if actual is None:
      stale.append(f"{kind} | {' | '.join(parts)}: quoted {quoted}, not in this report")
    elif not _matches(actual, quoted):
      shown = f"{actual:.4g}" if isinstance(actual, float) else actual
      stale.append(f"{kind} | {' | '.join(parts)}: quoted {quoted}, now {shown}")
  return len(found), stale


def flag(path: str, data: dict[str, Any], when: str) -> str:
  """Checks the reading at `path` against `data`, rewrites its banner (added when numbers no longer match,
  removed when all do) and returns one line for RESULTS.md's header ("" when there is no reading)."""
  if not os.path.isfile(path):
    return ""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  body = text.split("\n\n", 1)[1] if text.startswith(BANNER) else text
  count, stale = check(body, data)
  name = os.path.basename(path)
  if stale:
    banner = (f"{BANNER} ({when}): {len(stale)} of the {count} numbers this reading quotes no longer match "
              f"RESULTS.json:\n" + "\n".join(f"> - {line}" for line in stale))
    body = banner + "\n\n" + body
    status = (f"Reading: [{name}]({name}) (hand-written) is **out of date**: {len(stale)} of its {count} quoted "
              "numbers no longer match this report.")
  elif count:
    status = f"Reading: [{name}]({name}) (hand-written); its {count} quoted numbers match this report."
  else:
    status = f"Reading: [{name}]({name}) (hand-written) quotes no numbers this summary can check."
  if body != text:
    with open(path, "w", encoding="utf-8") as f:
      f.write(body)
  return status
