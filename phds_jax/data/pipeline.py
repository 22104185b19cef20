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
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from phds_jax.io import files as files_lib

if TYPE_CHECKING:
  import grain

log = logging.getLogger("phds_jax")

ROW_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")
HUB = "hf:"  # a source named hf:NAME[:SPLIT] is a dataset in the Hugging Face datasets cache


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


def split_sources(value: str) -> list[str]:
  """data.train_files / val_files: the comma-separated sources (glob patterns, hf:NAME), stripped."""
  return [p.strip() for p in value.split(",") if p.strip()]


def source_files(patterns: Sequence[str] | str) -> list[str]:
  """Files matching glob `patterns` (a sequence, or one string of comma-separated patterns); an hf:NAME
  source (a datasets cache entry) is passed on as it is."""
  patterns = split_sources(patterns) if isinstance(patterns, str) else list(patterns)
  if not patterns:
    raise DataError("no data files configured")
  files = []
  for pattern in patterns:
    if pattern.startswith(HUB):
      files.append(pattern)
      continue
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
  `save_to_disk` ("dir:row N"; read locally, nothing is downloaded), or `hf:NAME[:SPLIT]`, a dataset in the
  Hugging Face datasets cache ("hf:NAME:row N"; never fetched)."""
  if path.startswith(HUB):
    yield from _hub_records(path)
  elif files_lib.isfile(os.path.join(path, "dataset_info.json")) or files_lib.isfile(os.path.join(path, "state.json")):
    datasets = _datasets(path)
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


def _datasets(source: str):
  """The `datasets` package (the [datasets] extra), or a DataError naming the source that needs it."""
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise DataError(f"{source}: reading Hugging Face datasets needs the datasets package: "
                    "pip install -e \".[datasets]\" (or pip install datasets)") from None
  return datasets


def _hub_records(spec: str) -> Iterator[tuple[str, dict]]:
  name, _, split = spec[len(HUB):].partition(":")
  os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"  # the cache only: no network at run time
  datasets = _datasets(spec)

  try:
    dataset = datasets.load_dataset(name, split=split or "train")
  except Exception as e:  # pylint: disable=broad-except  (not cached: several error types across versions)
    raise DataError(
        f"{spec}: not in the Hugging Face datasets cache ({datasets.config.HF_DATASETS_CACHE}), and nothing is "
        f"downloaded at run time; on a machine with the hub, once: python -c \"import datasets; "
        f"datasets.load_dataset('{name}', split='{split or 'train'}')\" ({type(e).__name__})") from None
  for number, record in enumerate(dataset, 1):
    yield f"{spec}:row {number}", _present(record)


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
  prefix = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and adds_bos(tokenizer) else [])
  p = prefix + tokenizer.encode(prompt, add_special_tokens=False)
  r = tokenizer.encode(response, add_special_tokens=False)
  if tokenizer.eos_token_id is not None:
    r = r + [tokenizer.eos_token_id]
  if not r:
    raise ValueError("empty response")
  return Example(p + r, [False] * len(p) + [True] * len(r))


def adds_bos(tokenizer) -> bool:
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
    ids += tokenizer.encode(turn_text(m), add_special_tokens=False)
    if m["role"] == "assistant" and tokenizer.eos_token_id is not None:
      ids.append(tokenizer.eos_token_id)  # the model learns to end its turn
  return ids


def turn_text(message: dict) -> str:
  """One conversation turn as text without a chat template: "<|role|>\ncontent\n" (EOS follows assistant turns)."""
  return f"<|{message['role']}|>\n{message['content']}\n"


def read_sft(patterns, tokenizer, *, on_error: str = "skip", stats: Optional[ReadStats] = None) -> list[Example]:
  """Tokenized SFT examples from JSONL files, parquet files or saved `datasets` directories (read_records;
  loss on responses only)."""
  stats = stats or ReadStats()
  examples = []
  for path in source_files(patterns):
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
  for path in source_files(patterns):
    if path.endswith((".jsonl", ".json", ".parquet")) or path.startswith(HUB) or files_lib.isdir(path):
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


def pack(examples: Iterable[Example], seq_len: int, *, max_loss_tokens: int = 0,
         stats: Optional[ReadStats] = None) -> list[dict[str, np.ndarray]]:
  """First-fit packing into rows of `seq_len` positions (an example of n tokens takes n - 1 positions).

  max_loss_tokens > 0 caps the trained positions per row (so the loss can gather them statically);
  examples longer than a row are cut at the end and counted in stats.truncated.
  """
  return [_row(group, seq_len) for group in pack_groups(examples, seq_len, max_loss_tokens=max_loss_tokens,
                                                         stats=stats)]


def pack_groups(examples: Iterable[Example], seq_len: int, *, max_loss_tokens: int = 0,
                stats: Optional[ReadStats] = None, window: Optional[int] = None) -> Iterator[list[Example]]:
  """The examples of each packed row, rows in the order they were opened (see `pack`).

  window: at most this many rows stay open; when an example fits none of them and the window is full, the
  oldest is finished (memory and time per example bounded: prepared data). None keeps every row open.
  """
  cap = max_loss_tokens or seq_len
  rows: list[list[Example]] = []  # the open rows, oldest first
  free = np.zeros(0, np.int64)  # free positions per open row
  free_loss = np.zeros(0, np.int64)  # free loss slots per open row
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
    fits = np.flatnonzero((free >= need) & (free_loss >= need_loss))
    if fits.size:
      i = int(fits[0])
      rows[i].append(ex)
      free[i] -= need
      free_loss[i] -= need_loss
      continue
    if window is not None and len(rows) >= window:
      yield rows.pop(0)
      free, free_loss = free[1:], free_loss[1:]
    rows.append([ex])
    free, free_loss = np.append(free, seq_len - need), np.append(free_loss, cap - need_loss)
  yield from rows


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


def mixture_weights(value: str, sources: Optional[int] = None) -> Optional[list[float]]:
  """data.mixture "3,1" -> [3.0, 1.0] (None for ""); ValueError unless every weight is a positive number and,
  when `sources` is given, there is one per source."""
  if not value.strip():
    return None
  try:
    weights = [float(w) for w in value.split(",")]
  except ValueError:
    raise ValueError(f"data.mixture={value!r}: expected comma-separated numbers, one per data.train_files "
                     "source") from None
  if any(not w > 0 for w in weights):
    raise ValueError(f"data.mixture={value!r}: every weight must be positive")
  if sources is not None and len(weights) != sources:
    raise ValueError(f"data.mixture={value!r} has {len(weights)} weights for {sources} data.train_files sources")
  return weights


def split_validation(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
  """Deterministic (seeded) train/validation split of whole examples."""
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"val_fraction={fraction} must lie in [0, 1)")
  order = np.random.default_rng(seed).permutation(len(examples))
  n_val = int(round(fraction * len(examples)))
  val = [examples[i] for i in sorted(order[:n_val])]
  train = [examples[i] for i in sorted(order[n_val:])]
  return train, val


def shuffled_stream(sources: Sequence[Sequence[dict[str, np.ndarray]]], *, seed: int,
                    weights: Optional[Sequence[float]] = None) -> grain.MapDataset:
  """The endless training stream: each source (a list of rows, or a grain MapDataset of them, e.g. prepared
  shards) reshuffled every epoch from `seed`; several sources are interleaved by `weights` (data.mixture),
  a smaller one repeating sooner. Nothing is read until a row is asked for."""
  import grain  # pylint: disable=g-import-not-at-top  (grain imports jax: the prepare job and config checks do not)

  if weights is not None and len(weights) != len(sources):
    raise DataError(f"data.mixture has {len(weights)} weights for {len(sources)} sources")
  streams = [(source if isinstance(source, grain.MapDataset) else grain.MapDataset.source(source))
             .shuffle(seed=seed + i).repeat(None) for i, source in enumerate(sources)]
  return streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, weights)


def train_batches(rows, global_batch_size: int, *, seed: int, process_index: int = 0, process_count: int = 1,
                  weights: Optional[Sequence[float]] = None, read_threads: int = 0) -> grain.DatasetIterator:
  """Infinite, per-epoch reshuffled global batches of `rows` (a list of rows, a MapDataset of them, or, with
  `weights`, one of those per source: shuffled_stream), of which this process gets its contiguous share
  (rows [p * B / P, (p + 1) * B / P) of each): the data a step sees does not depend on how many processes
  run it, and the iterator's state (the number of batches taken) resumes on any process count.
  read_threads > 0 reads rows ahead in threads (prepared shards); 0 reads in the caller (rows in memory)."""
  if global_batch_size % process_count:
    raise DataError(f"a global batch of {global_batch_size} rows does not split over {process_count} processes")
  sources = rows if weights is not None else [rows]
  if sum(len(source) for source in sources) < global_batch_size:
    raise DataError(f"{sum(len(s) for s in sources)} packed rows cannot fill one batch of {global_batch_size}; "
                    "add data or lower the batch size")
  import grain  # pylint: disable=g-import-not-at-top

  local = global_batch_size // process_count
  begin = process_index * local
  stream = shuffled_stream(sources, seed=seed, weights=weights)
  steps = len(stream) // global_batch_size
  # local position i of this process = row (i // local) * B + begin + i % local of the global stream: each
  # process reads only its own rows
  mine = grain.MapDataset.range(steps * local).map(
      lambda i: stream[(i // local) * global_batch_size + begin + i % local])
  ds = mine.batch(local, drop_remainder=True)
  # rows in memory: no reader threads, no read-ahead (grain's default keeps 500 batches in flight)
  options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * local if read_threads else 0)
  return iter(ds.to_iter_dataset(options))


class Batches:
  """Every row of `rows` (a list of rows, or a grain MapDataset of them: prepared shards) once, in order, in
  global batches of `batch_size` padded with empty rows (weight 0), of which this process reads and yields
  only its share (rows [p * B / P, (p + 1) * B / P) of each, as training batches are split); read lazily,
  one batch in memory at a time, iterable any number of times. limit > 0: only the first `limit` rows."""

  def __init__(self, rows, batch_size: int, limit: int = 0, process_index: int = 0, process_count: int = 1):
    if batch_size % process_count:
      raise DataError(f"eval.batch_size={batch_size} validation rows do not split over {process_count} processes")
    self.rows, self.batch_size = rows, batch_size
    self.count = min(len(rows), limit) if limit else len(rows)
    self.local = batch_size // process_count
    self.begin = process_index * self.local

  def __len__(self) -> int:
    return -(-self.count // self.batch_size)

  def __iter__(self):
    empty = None
    for start in range(self.begin, self.begin + len(self) * self.batch_size, self.batch_size):
      rows = [self.rows[i] for i in range(start, min(start + self.local, self.count))]
      empty = empty or {key: np.zeros_like(value) for key, value in (rows or [self.rows[0]])[0].items()}
      rows += [empty] * (self.local - len(rows))
      yield {key: np.stack([r[key] for r in rows]) for key in ROW_KEYS}


def eval_batches(rows: list[dict[str, np.ndarray]], batch_size: int) -> list[dict[str, np.ndarray]]:
  """Every row once, in order, in batches padded with empty rows (weight 0) to `batch_size`, as a list."""
  return list(Batches(rows, batch_size))


def describe(rows: list[dict[str, np.ndarray]]) -> str:
  if not rows:
    return "0 rows"
  filled = np.mean([np.mean(r["segment_ids"] > 0) for r in rows])
  trained = int(sum(r["weights"].sum() for r in rows))
  return f"{len(rows)} rows, {filled:.0%} filled, {trained:,} trained tokens"
