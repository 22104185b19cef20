"""A training run's data: packed rows built in memory from data.train_files (small data), or streamed from
a prepared dataset (data.prepared, written by configs/prepare.py), as the same two things: an endless,
checkpointable iterator of this process's share of each global batch, and the validation batches.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from typing import Any, Iterable, Optional

import numpy as np

from phds_jax.data import pipeline as data_lib
from phds_jax.data import prepared as prepared_lib


@dataclasses.dataclass
class RunData:
  iterator: Any  # grain DatasetIterator: next() -> this process's rows of the next global batch
  val_batches: Iterable[dict[str, np.ndarray]]  # this process's share of every validation batch (pipeline.Batches)
  summary: str  # one line for the person running the job


def build_rows(config, tokenizer) -> tuple[list, list, data_lib.ReadStats]:
  """(train rows, validation rows, stats) from config.data's files, in memory."""
  train, val, stats = _rows_per_source(config, tokenizer)
  return [row for rows in train for row in rows], val, stats


def _rows_per_source(config, tokenizer) -> tuple[list[list], list, data_lib.ReadStats]:
  """(train rows of each data.train_files source, validation rows, stats)."""
  d = config.data
  stats = data_lib.ReadStats()
  if d.format not in ("sft", "text"):
    raise ValueError(f"data.format={d.format!r}; choose sft or text")
  read = data_lib.read_sft if d.format == "sft" else data_lib.read_text
  pack = functools.partial(data_lib.pack, seq_len=d.seq_len, max_loss_tokens=d.max_loss_tokens, stats=stats)
  chunk = (lambda examples: data_lib.chunk_examples(examples, d.seq_len)) if d.format == "text" else (lambda e: e)
  sources = data_lib.split_sources(d.train_files) if d.mixture else [d.train_files]
  train, val = [], []
  for pattern in sources:
    examples = read(pattern, tokenizer, on_error=d.on_error, stats=stats)
    if not d.val_files:
      examples, held = data_lib.split_validation(examples, d.val_fraction, d.seed)
      val += held
    train.append(pack(chunk(examples)))
  if d.val_files:
    val = read(d.val_files, tokenizer, on_error=d.on_error, stats=stats)
  return train, pack(chunk(val)), stats


def fingerprint(config) -> Optional[str]:
  """What identifies the run's prepared data in a workdir's identity (None without data.prepared)."""
  if not config.data.prepared:
    return None
  manifest = prepared_lib.read_manifest(config.data.prepared)  # the manifest alone, also in a bucket
  return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def build(config, tokenizer, global_batch: int, process_index: int, process_count: int) -> RunData:
  """The run's training iterator and validation batches, from data.prepared or from data.train_files."""
  d = config.data
  if d.prepared:
    directory, manifest = prepared_lib.open_for_run(d, config.tokenizer_path or config.model_path, tokenizer,
                                                     d.max_loss_tokens)
    train_sources = [s for s in manifest["sources"] if s["kind"] == "train"]
    weights = data_lib.mixture_weights(d.mixture, len(train_sources))
    sources = prepared_lib.train_sources(directory, manifest, mixture=weights is not None)
    iterator = data_lib.train_batches(sources if weights else sources[0], global_batch, seed=d.seed,
                                      process_index=process_index, process_count=process_count, weights=weights,
                                      read_threads=2)
    val = data_lib.Batches(prepared_lib.validation_rows(directory, manifest), config.eval.batch_size,
                               config.eval.max_rows, process_index, process_count)
    summary = (f"data: prepared {d.prepared} ({sum(s['records'] for s in manifest['sources']):,} records, "
               f"{sum(s['malformed'] for s in manifest['sources']):,} malformed skipped when prepared); train "
               f"{sum(s['train_rows'] for s in train_sources):,} rows, "
               f"{sum(s['train_trained_tokens'] for s in train_sources):,} trained tokens; validation "
               f"{val.count:,} rows{_capped(val.count, len(val.rows))}; each process reads its share of every batch")
    if len(train_sources) > 1:
      summary += "\n  " + prepared_lib.describe_mixture(train_sources, weights).replace("; ", "\n  ")
    return RunData(iterator, val, summary)
  train, val, stats = _rows_per_source(config, tokenizer)
  weights = data_lib.mixture_weights(d.mixture, len(train) if d.mixture else None)
  iterator = data_lib.train_batches(train if weights else train[0], global_batch, seed=d.seed,
                                    process_index=process_index, process_count=process_count, weights=weights)
  scored = val[:config.eval.max_rows] if config.eval.max_rows else val
  summary = (f"data: {stats.records} records ({stats.skipped} skipped, {stats.truncated} truncated); "
             f"train {data_lib.describe([r for rows in train for r in rows])}; validation "
             f"{data_lib.describe(scored)}{_capped(len(scored), len(val))}")
  if weights:
    sources = [{"pattern": p, "train_rows": len(rows)} for p, rows in zip(data_lib.split_sources(d.train_files), train)]
    summary += "\n  " + prepared_lib.describe_mixture(sources, weights).replace("; ", "\n  ")
  return RunData(iterator, data_lib.Batches(scored, config.eval.batch_size, 0, process_index, process_count),
                 summary)


def _capped(scored: int, available: int) -> str:
  return f" (the first of {available:,}: eval.max_rows)" if scored < available else ""
