"""Prepared datasets: packed rows tokenized once (phds_jax/data/prepare.py), read back through grain.

A prepared directory (local, or a gs:// bucket copied once into the local cache to be read) holds
  manifest.json                         what was prepared from what, and how (`read_manifest`)
  train/s<S>-<C>.array_record           packed rows of chunk C of source S (ArrayRecord, one row a record)
  val/s<S>-<C>.array_record             the same chunk's validation rows
  chunks/s<S>-<C>.json                  the chunk's counts; written last, so a chunk that has it is complete
A row is stored as its examples (lengths, tokens, loss masks: `encode_row`), about 5 bytes per token;
`decode_row` rebuilds the five arrays of pipeline's row format exactly as pipeline.pack builds them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from phds_jax.data.pipeline import ROW_KEYS, DataError, Example
from phds_jax.io import files as files_lib

if TYPE_CHECKING:
  import grain

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# what transformers reads from a tokenizer directory; the hash of these is the tokenizer's identity
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")
# ArrayRecord: one record per chunk of the file, so a row is read without decompressing its neighbours
WRITER_OPTIONS = "group_size:1"


def encode_row(examples: Sequence[Example]) -> bytes:
  """One packed row's examples as bytes: [count, total] uint32, lengths uint32, tokens uint32, masks uint8."""
  lengths = np.array([len(ex.tokens) for ex in examples], "<u4")
  tokens = np.array(list(itertools.chain.from_iterable(ex.tokens for ex in examples)), "<u4")
  mask = np.array(list(itertools.chain.from_iterable(ex.loss_mask for ex in examples)), np.uint8)
  return b"".join([np.array([len(examples), lengths.sum()], "<u4").tobytes(), lengths.tobytes(),
                   tokens.tobytes(), mask.tobytes()])


def decode_row(data: bytes, seq_len: int) -> dict[str, np.ndarray]:
  """The row format of pipeline.pack (inputs, targets, weights, segment_ids, positions; each [seq_len])."""
  count, total = np.frombuffer(data, "<u4", 2)
  lengths = np.frombuffer(data, "<u4", count, 8).astype(np.int64)
  tokens = np.frombuffer(data, "<u4", total, 8 + 4 * count).astype(np.int32)
  mask = np.frombuffer(data, np.uint8, total, 8 + 4 * (count + total))
  ends = np.cumsum(lengths)  # one past each example's last token
  is_last, is_first = np.zeros(total, bool), np.zeros(total, bool)
  is_last[ends - 1], is_first[ends - lengths] = True, True
  n = total - count  # positions used: an example of m tokens takes m - 1
  row = {key: np.zeros(seq_len, np.float32 if key == "weights" else np.int32) for key in ROW_KEYS}
  row["inputs"][:n] = tokens[~is_last]
  row["targets"][:n] = tokens[~is_first]
  row["weights"][:n] = mask[~is_first]
  segment = np.repeat(np.arange(1, count + 1, dtype=np.int32), lengths - 1)
  row["segment_ids"][:n] = segment
  starts = np.concatenate([[0], np.cumsum(lengths - 1)[:-1]])
  row["positions"][:n] = np.arange(n) - np.repeat(starts, lengths - 1)
  return row


def tokenizer_identity(directory: str) -> dict[str, Any]:
  """{"sha256": hash of the tokenizer's files (TOKENIZER_FILES present in `directory`), "files": their names}."""
  digest, names = hashlib.sha256(), []
  for name in TOKENIZER_FILES:
    path = os.path.join(directory, name)
    if files_lib.isfile(path):
      with files_lib.open_file(path, "rb") as f:
        digest.update(name.encode() + b"\0" + f.read() + b"\0")
      names.append(name)
  if not names:
    raise DataError(f"{directory}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...)")
  return {"sha256": digest.hexdigest(), "files": names}


def chat_template(tokenizer) -> Optional[str]:
  """The tokenizer's chat template as stored in a manifest (None: conversations use the built-in turns)."""
  template = getattr(tokenizer, "chat_template", None)
  return template if template is None or isinstance(template, str) else json.dumps(template, sort_keys=True)


@dataclasses.dataclass(frozen=True)
class Expected:
  """What a run expects of its data: a prepared dataset must have been made the same way."""

  tokenizer: dict[str, Any]  # tokenizer_identity
  seq_len: int
  chat_template: Optional[str]
  format: str
  max_loss_tokens: int


def differences(manifest: dict[str, Any], run: Expected) -> list[str]:
  """One line per way `manifest` was prepared differently from what `run` expects ([] when it fits)."""
  out = []
  if manifest["tokenizer"]["sha256"] != run.tokenizer["sha256"]:
    out.append(f"tokenizer: prepared with {manifest['tokenizer_path']} (sha256 {manifest['tokenizer']['sha256'][:12]}), "
               f"the run's has sha256 {run.tokenizer['sha256'][:12]}")
  if manifest["seq_len"] != run.seq_len:
    out.append(f"data.seq_len: prepared {manifest['seq_len']}, the run's {run.seq_len}")
  if manifest["chat_template"] != run.chat_template:
    describe = lambda t: "none (built-in turns)" if t is None else f"sha256 {hashlib.sha256(t.encode()).hexdigest()[:12]}"
    out.append(f"chat template: prepared {describe(manifest['chat_template'])}, the run's tokenizer "
               f"{describe(run.chat_template)}")
  if manifest["format"] != run.format:
    out.append(f"data.format: prepared {manifest['format']!r}, the run's {run.format!r}")
  prepared_cap = manifest["max_loss_tokens"]
  if run.max_loss_tokens and not 0 < prepared_cap <= run.max_loss_tokens:
    out.append(f"data.max_loss_tokens: rows prepared with {prepared_cap or 'no'} cap on trained tokens, the run "
               f"gathers at most {run.max_loss_tokens} per row")
  return out


def local_copy(path: str) -> str:
  """A local directory holding the prepared dataset `path`: a bucket's is copied into the cache once (by one
  process at a time: processes sharing a machine wait for the first one's copy), and again when the
  bucket's manifest changed (the dataset was prepared anew)."""
  if not files_lib.is_bucket(path):
    return path
  cache = files_lib.cache_dir()
  local = files_lib.local_mirror(path, cache)
  os.makedirs(os.path.dirname(local), exist_ok=True)
  with files_lib.exclusive(local + ".lock"):
    copied = os.path.join(local, MANIFEST)
    if os.path.isfile(copied) and files_lib.isfile(os.path.join(path, MANIFEST)):
      with open(copied, encoding="utf-8") as f:
        stale = f.read() != files_lib.read_text(os.path.join(path, MANIFEST))
      if stale and os.path.exists(local + ".complete"):
        os.remove(local + ".complete")
    return files_lib.stage(path, cache)


def read_manifest(path: str) -> dict[str, Any]:
  """The manifest of the prepared dataset at `path` (DataError when there is none, or it is unfinished)."""
  where = os.path.join(path, MANIFEST)
  if not files_lib.isfile(where):
    raise DataError(f"data.prepared={path!r}: no {MANIFEST} there; make one with "
                    "python -m phds_jax.main --config=configs/prepare.py (an unfinished prepare writes it last)")
  manifest = json.loads(files_lib.read_text(where))
  if manifest.get("version") != FORMAT_VERSION:
    raise DataError(f"{where}: format version {manifest.get('version')}, this phds_jax reads {FORMAT_VERSION}; "
                    "prepare the data again")
  return manifest


def check(manifest: dict[str, Any], run: Expected, path: str):
  """Refuses, in one message listing every difference, a prepared dataset the run cannot use."""
  found = differences(manifest, run)
  if found:
    listed = "\n".join(f"  - {line}" for line in found)
    raise DataError(f"data.prepared={path!r} was prepared differently from this run; prepare it again with the "
                    f"run's settings (or change the run's). Differences:\n{listed}")


def open_for_run(data, tokenizer_dir: str, tokenizer, max_loss_tokens: int) -> tuple[str, dict[str, Any]]:
  """(local directory, manifest) of data.prepared (`data`: a config's data block), refused in one message
  when it was prepared differently from the run: the tokenizer in `tokenizer_dir` (loaded: `tokenizer`),
  data.seq_len, the chat template, data.format, a cap of trained tokens per row within `max_loss_tokens`
  (0: any)."""
  directory = local_copy(data.prepared)
  manifest = read_manifest(directory)
  identity = tokenizer_identity(files_lib.stage(tokenizer_dir, files_lib.cache_dir()))
  check(manifest, Expected(identity, data.seq_len, chat_template(tokenizer), data.format, max_loss_tokens),
        data.prepared)
  return directory, manifest


def _rows(directory: str, shard_names: Sequence[str], seq_len: int) -> grain.MapDataset:
  import grain  # pylint: disable=g-import-not-at-top  (grain imports jax; the prepare job does not need it)

  paths = [os.path.join(directory, name) for name in shard_names]
  if not paths:
    return grain.MapDataset.source([])
  source = grain.sources.ArrayRecordDataSource(paths)
  return grain.MapDataset.source(source).map(lambda data: decode_row(data, seq_len))


def train_sources(directory: str, manifest: dict[str, Any], mixture: bool) -> list[grain.MapDataset]:
  """Training rows of a (local) prepared dataset: one MapDataset per source with `mixture`, else one of all."""
  per_source = [source["train_shards"] for source in manifest["sources"] if source["kind"] == "train"]
  if not mixture:
    per_source = [[shard for shards in per_source for shard in shards]]
  return [_rows(directory, shards, manifest["seq_len"]) for shards in per_source]


def validation_rows(directory: str, manifest: dict[str, Any]) -> grain.MapDataset:
  return _rows(directory, [s for source in manifest["sources"] for s in source["val_shards"]], manifest["seq_len"])


def describe_mixture(sources: Sequence[dict[str, Any]], weights: Optional[Sequence[float]]) -> str:
  """Each training source's rows and share of the stream ("; "-separated): by `weights` (data.mixture), else
  by size. sources: manifest entries (or any dicts with "pattern" and "train_rows")."""
  rows = [source["train_rows"] for source in sources]
  shares = np.asarray(weights if weights is not None else rows, np.float64)
  shares = shares / shares.sum()
  return "; ".join(f"source {i} {source['pattern']}: {n:,} rows, {share:.1%} of the rows drawn" +
                   (f" (an epoch every {n / share:,.0f} rows drawn)" if weights is not None else "")
                   for i, (source, n, share) in enumerate(zip(sources, rows, shares)))
