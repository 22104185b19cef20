"""Input pipelines: JSONL SFT and plain-text LM data -> tokenized, packed rows -> grain batches.

A packed row holds several examples end to end:
  inputs [L] int32      token ids (0 after the last example)
  targets [L] int32     the next token of the same example at every position
  weights [L] float32   1 where that next token is trained on (response tokens for SFT, all for LM)
  segment_ids [L] int32 1, 2, ... per example, 0 for padding (attention never crosses segments)
  positions [L] int32   restart at 0 in each example
Rows are built once, deterministically; grain shuffles them per epoch from a seed, shards them per host
and batches them, and its iterator state goes into every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Iterable, Iterator, Optional, Sequence

import grain
import numpy as np

from phds_jax.io import files as files_lib

log = logging.getLogger("phds_jax")

ROW_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")


class DataError(ValueError):
  """Bad data: a malformed record (named by file:line) or a dataset with nothing usable."""


@dataclasses.dataclass
class Example:
  """One tokenized example. loss_mask[i]: token i is a training target."""

  tokens: list[int]
  loss_mask: list[bool]


@dataclasses.dataclass
class ReadStats:
  records: int = 0
  skipped: int = 0
  truncated: int = 0


def load_tokenizer(path: str):
  """A transformers tokenizer from a model (or tokenizer) directory."""
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top

  return AutoTokenizer.from_pretrained(path)


def _files(patterns: Sequence[str] | str) -> list[str]:
  """Files matching glob `patterns` (a sequence, or one string of comma-separated patterns)."""
  patterns = [p.strip() for p in patterns.split(",") if p.strip()] if isinstance(patterns, str) else list(patterns)
  if not patterns:
    raise DataError("no data files configured")
  files = []
  for pattern in patterns:
    matched = files_lib.glob(pattern)
    if not matched:
      raise DataError(f"no file matches {pattern!r}")
    files += matched
  return files


def read_jsonl(path: str, stats: ReadStats, on_error: str) -> Iterator[tuple[str, dict]]:
  """Yields ("file:line", record) for each JSON object line; bad lines are skipped (counted) or fatal."""
  with files_lib.open_file(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        record = json.loads(line)
        if not isinstance(record, dict):
          raise ValueError(f"expected a JSON object, got {type(record).__name__}")
      except ValueError as e:
        _bad(where, str(e), stats, on_error)
        continue
      yield where, record


def read_records(path: str, stats: ReadStats, on_error: str) -> Iterator[tuple[str, dict]]:
  """Yields (where, record) from one source: a JSONL file ("file:line"), a parquet file ("file:row N",
  through pyarrow, one record batch at a time) or a Hugging Face `datasets` directory written by
  `save_to_disk` ("dir:row N"; read locally, nothing is downloaded)."""
  if files_lib.isfile(os.path.join(path, "dataset_info.json")) or files_lib.isfile(os.path.join(path, "state.json")):
    import datasets  # pylint: disable=g-import-not-at-top

    for number, record in enumerate(datasets.load_from_disk(files_lib.stage(path, files_lib.cache_dir())), 1):
      yield f"{path}:row {number}", _present(record)
  elif path.endswith(".parquet"):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

    number = 0
    for batch in pq.ParquetFile(files_lib.stage(path, files_lib.cache_dir())).iter_batches():
      for record in batch.to_pylist():
        number += 1
        yield f"{path}:row {number}", _present(record)
  else:
    yield from read_jsonl(path, stats, on_error)


def _present(record: dict) -> dict:
  """A table row without its null columns (a column another row filled), as the JSONL line would be."""
  return {key: value for key, value in record.items() if value is not None}


def _bad(where: str, reason: str, stats: ReadStats, on_error: str):
  if on_error == "raise":
    raise DataError(f"{where}: {reason}")
  stats.skipped += 1
  if stats.skipped <= 5:
    log.warning("skipping %s: %s", where, reason)


def _sft_example(record: dict, tokenizer) -> Example:
  """{"prompt", "response"} or {"messages": [...]} -> Example with loss on the response/assistant tokens."""
  if "messages" in record:
    return _chat_example(record["messages"], tokenizer)
  prompt, response = record.get("prompt"), record.get("response")
  if not isinstance(prompt, str) or not isinstance(response, str):
    raise ValueError('expected string fields "prompt" and "response" (or a "messages" list)')
  prefix = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and _adds_bos(tokenizer) else [])
  p = prefix + tokenizer.encode(prompt, add_special_tokens=False)
  r = tokenizer.encode(response, add_special_tokens=False)
  if tokenizer.eos_token_id is not None:
    r = r + [tokenizer.eos_token_id]
  if not r:
    raise ValueError("empty response")
  return Example(p + r, [False] * len(p) + [True] * len(r))


def _adds_bos(tokenizer) -> bool:
  ids = tokenizer.encode("a", add_special_tokens=True)
  return bool(ids) and ids[0] == tokenizer.bos_token_id


def _chat_example(messages: Any, tokenizer) -> Example:
  if not isinstance(messages, list) or not messages or not all(
      isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
      for m in messages):
    raise ValueError('"messages" must be a non-empty list of {"role": str, "content": str}')
  if not any(m["role"] == "assistant" for m in messages):
    raise ValueError('"messages" has no assistant turn to train on')
  tokens: list[int] = []
  mask: list[bool] = []
  for i, message in enumerate(messages):
    upto = _render_chat(messages[: i + 1], tokenizer)
    new = upto[len(tokens):]
    if upto[: len(tokens)] != tokens:
      raise ValueError("the chat template does not render conversations prefix-consistently")
    tokens += new
    mask += [message["role"] == "assistant"] * len(new)
  return Example(tokens, mask)


def _render_chat(messages: list[dict], tokenizer) -> list[int]:
  """Token ids of `messages` by the tokenizer's chat template, else "<|role|>\ncontent\n" turns."""
  if getattr(tokenizer, "chat_template", None):
    out = tokenizer.apply_chat_template(messages, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)
  ids = []
  for m in messages:
    ids += tokenizer.encode(f"<|{m['role']}|>\n{m['content']}\n", add_special_tokens=False)
    if m["role"] == "assistant" and tokenizer.eos_token_id is not None:
      ids.append(tokenizer.eos_token_id)  # the model learns to end its turn
  return ids


def read_sft(patterns, tokenizer, *, on_error: str = "skip", stats: Optional[ReadStats] = None) -> list[Example]:
  """Tokenized SFT examples from JSONL files, parquet files or saved `datasets` directories (read_records;
  loss on responses only)."""
  stats = stats or ReadStats()
  examples = []
  for path in _files(patterns):
    for where, record in read_records(path, stats, on_error):
      try:
        examples.append(_sft_example(record, tokenizer))
        stats.records += 1
      except ValueError as e:
        _bad(where, str(e), stats, on_error)
  if not examples:
    raise DataError(f"no usable SFT examples in {patterns} ({stats.skipped} malformed lines skipped)")
  return examples


def read_text(patterns, tokenizer, *, on_error: str = "skip", stats: Optional[ReadStats] = None) -> list[Example]:
  """LM examples (loss on every token) from .txt files (documents split at blank lines) or JSONL {"text"}."""
  stats = stats or ReadStats()
  examples = []
  for path in _files(patterns):
    if path.endswith((".jsonl", ".json", ".parquet")) or files_lib.isdir(path):
      docs = []
      for where, record in read_records(path, stats, on_error):
        if isinstance(record.get("text"), str) and record["text"].strip():
          docs.append(record["text"])
        else:
          _bad(where, 'expected a non-empty string field "text"', stats, on_error)
    else:
      with files_lib.open_file(path) as f:
        docs = [d.strip() for d in f.read().split("\n\n") if d.strip()]
    for doc in docs:
      ids = tokenizer.encode(doc, add_special_tokens=False)
      if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
      examples.append(Example(ids, [True] * len(ids)))
      stats.records += 1
  if not examples:
    raise DataError(f"no usable text in {patterns} ({stats.skipped} malformed lines skipped)")
  return examples


def chunk_examples(examples: Iterable[Example], length: int) -> list[Example]:
  """Splits long examples into pieces of at most `length` + 1 tokens (LM data: nothing is lost)."""
  out = []
  for ex in examples:
    for start in range(0, max(1, len(ex.tokens) - 1), length):
      piece = slice(start, start + length + 1)
      if len(ex.tokens[piece]) > 1:
        out.append(Example(ex.tokens[piece], ex.loss_mask[piece]))
  return out


def pack(examples: Sequence[Example], seq_len: int, *, max_loss_tokens: int = 0,
         stats: Optional[ReadStats] = None) -> list[dict[str, np.ndarray]]:
  """First-fit packing into rows of `seq_len` positions (an example of n tokens takes n - 1 positions).

  max_loss_tokens > 0 caps the trained positions per row (so the loss can gather them statically);
  examples longer than a row are cut at the end and counted in stats.truncated.
  """
  rows: list[list[Example]] = []
  room: list[tuple[int, int]] = []  # (free positions, free loss slots) per row
  cap = max_loss_tokens or seq_len
  for ex in examples:
    if len(ex.tokens) - 1 > seq_len:
      ex = Example(ex.tokens[: seq_len + 1], ex.loss_mask[: seq_len + 1])
      if stats:
        stats.truncated += 1
    need = len(ex.tokens) - 1
    need_loss = sum(ex.loss_mask[1:])
    if need < 1 or need_loss < 1:
      continue
    if need_loss > cap:
      raise DataError(f"an example has {need_loss} trained tokens, more than max_loss_tokens={cap}")
    for i, (free, free_loss) in enumerate(room):
      if need <= free and need_loss <= free_loss:
        rows[i].append(ex)
        room[i] = (free - need, free_loss - need_loss)
        break
    else:
      rows.append([ex])
      room.append((seq_len - need, cap - need_loss))
  return [_row(r, seq_len) for r in rows]


def _row(examples: list[Example], seq_len: int) -> dict[str, np.ndarray]:
  row = {key: np.zeros(seq_len, np.float32 if key == "weights" else np.int32) for key in ROW_KEYS}
  at = 0
  for segment, ex in enumerate(examples, 1):
    n = len(ex.tokens) - 1
    row["inputs"][at:at + n] = ex.tokens[:-1]
    row["targets"][at:at + n] = ex.tokens[1:]
    row["weights"][at:at + n] = ex.loss_mask[1:]
    row["segment_ids"][at:at + n] = segment
    row["positions"][at:at + n] = np.arange(n)
    at += n
  return row


def split_validation(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
  """Deterministic (seeded) train/validation split of whole examples."""
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"val_fraction={fraction} must lie in [0, 1)")
  order = np.random.default_rng(seed).permutation(len(examples))
  n_val = int(round(fraction * len(examples)))
  val = [examples[i] for i in sorted(order[:n_val])]
  train = [examples[i] for i in sorted(order[n_val:])]
  return train, val


def train_batches(rows: list[dict[str, np.ndarray]], global_batch_size: int, *, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """Infinite, per-epoch reshuffled global batches of `rows`, of which this process gets its contiguous
  share (rows [p * B / P, (p + 1) * B / P) of each): the data a step sees does not depend on how many
  processes run it. The iterator is checkpointable."""
  if global_batch_size % process_count:
    raise DataError(f"a global batch of {global_batch_size} rows does not split over {process_count} processes")
  if len(rows) < global_batch_size:
    raise DataError(f"{len(rows)} packed rows cannot fill one batch of {global_batch_size}; add data or lower "
                    "the batch size")
  local = global_batch_size // process_count
  begin = process_index * local
  shuffled = grain.MapDataset.source(rows).shuffle(seed=seed).repeat(None)
  steps = len(shuffled) // global_batch_size
  # local position i of this process = row (i // local) * B + begin + i % local of the global stream: each
  # process reads only its own rows
  mine = grain.MapDataset.range(steps * local).map(
      lambda i: shuffled[(i // local) * global_batch_size + begin + i % local])
  ds = mine.batch(local, drop_remainder=True)
  # rows are in memory: no reader threads, no read-ahead (grain's default keeps 500 batches in flight)
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def eval_batches(rows: list[dict[str, np.ndarray]], batch_size: int) -> list[dict[str, np.ndarray]]:
  """Every row once, in order, in batches padded with empty rows (weight 0) to `batch_size`."""
  if not rows:
    return []
  empty = {key: np.zeros_like(value) for key, value in rows[0].items()}
  padded = rows + [empty] * (-len(rows) % batch_size)
  return [{key: np.stack([r[key] for r in padded[i:i + batch_size]]) for key in ROW_KEYS}
          for i in range(0, len(padded), batch_size)]


def describe(rows: list[dict[str, np.ndarray]]) -> str:
  if not rows:
    return "0 rows"
  filled = np.mean([np.mean(r["segment_ids"] > 0) for r in rows])
  trained = int(sum(r["weights"].sum() for r in rows))
  return f"{len(rows)} rows, {filled:.0%} filled, {trained:,} trained tokens"
