"""The prepare job (`configs/prepare.py`): SFT or LM sources tokenized once, in parallel, into packed rows on
disk (layout: phds_jax/data/prepared.py), which training, evaluation and the study then stream.

Each pattern of data.train_files (and of data.val_files) is a source; a source's records are cut into
chunks of CHUNK_RECORDS in file order. A worker process takes a chunk: it parses and tokenizes its records
in batched fast-tokenizer calls (phds_jax/data/tokenize.py), splits off validation records (a draw seeded
by data.seed, the source and the chunk), packs each split into rows of data.seq_len (first fit among the
last PACK_WINDOW open rows) and writes the chunk's shards, then its counts. Everything depends only on the
inputs and settings, never on the number of workers or on where a run was interrupted, so a re-run skips
the chunks already written and produces the same bytes. The manifest is written last.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import multiprocessing
import multiprocessing.pool
import os
import shutil
import sys
import time
from typing import Any, Iterator, Optional

import numpy as np

from phds_jax.data import pipeline
from phds_jax.data import prepared as prepared_lib
from phds_jax.data import tokenize
from phds_jax.io import files as files_lib

CHUNK_RECORDS = 4096  # records per chunk: the unit of work, of resumption and of shards
PACK_WINDOW = 64  # rows kept open while packing (bounded memory and time per example)
SHOWN_ERRORS = 20  # malformed records named in the manifest (all of them: malformed.txt)


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything a chunk's bytes depend on besides its records."""

  format: str
  seq_len: int
  max_loss_tokens: int
  val_fraction: float  # of each training source's records (0 when data.val_files gives validation sources)
  seed: int
  on_error: str
  tokenizer_dir: str


@dataclasses.dataclass(frozen=True)
class Source:
  pattern: str
  kind: str  # "train" (split by val_fraction) or "val" (data.val_files: every record is for validation)
  files: tuple[str, ...]


# ---- reading records -------------------------------------------------------------------------------------


def _sources(config) -> list[Source]:
  d = config.data
  out = []
  for kind, field in (("train", d.train_files), ("val", d.val_files)):
    for pattern in pipeline.split_sources(field):
      out.append(Source(pattern, kind, tuple(pipeline.source_files(pattern))))
  return out


def _records(path: str, format_: str) -> Iterator[tuple[str, Any]]:
  """(where, record) of one file: a JSONL line is passed on unparsed (a worker parses it); other formats
  give dicts (pipeline.read_records); an LM .txt file gives its blank-line-separated documents."""
  if path.startswith(pipeline.HUB) or path.endswith(".parquet") or files_lib.isdir(path):
    yield from pipeline.read_records(path, pipeline.ReadStats(), "raise")
  elif format_ == "text" and not path.endswith((".jsonl", ".json")):
    yield from _documents(path)
  else:
    with files_lib.open_file(path) as f:
      for number, line in enumerate(f, 1):
        if line.strip():
          yield f"{path}:{number}", line


def _documents(path: str) -> Iterator[tuple[str, dict]]:
  lines, first = [], 0
  with files_lib.open_file(path) as f:
    for number, line in enumerate(f, 1):
      if line.strip():
        first = first or number
        lines.append(line)
      elif lines:
        yield f"{path}:{first}", {"text": "".join(lines).strip()}
        lines, first = [], 0
  if lines:
    yield f"{path}:{first}", {"text": "".join(lines).strip()}


def _count(path: str, format_: str) -> Optional[int]:
  """How many records `path` holds, where that is cheap to know (None for .txt documents, saved datasets
  directories, bucket files and the hub)."""
  if path.startswith(pipeline.HUB) or files_lib.is_bucket(path) or files_lib.isdir(path):
    return None  # (a bucket file would be downloaded twice)
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

    return pq.ParquetFile(files_lib.stage(path, files_lib.cache_dir())).metadata.num_rows
  if format_ == "text" and not path.endswith((".jsonl", ".json")):  # documents, not lines
    return None
  count = 0
  with files_lib.open_file(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      count += block.count(b"\n")
  return count


def _chunks(source: Source, format_: str) -> Iterator[list[tuple[str, Any]]]:
  chunk = []
  for path in source.files:
    for item in _records(path, format_):
      chunk.append(item)
      if len(chunk) == CHUNK_RECORDS:
        yield chunk
        chunk = []
  if chunk:
    yield chunk


# ---- one chunk (in a worker) -----------------------------------------------------------------------------

_TOKENIZER = None


def _load_worker(tokenizer_dir: str):
  global _TOKENIZER  # pylint: disable=global-statement  (one tokenizer per worker process)
  os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: the pool is the parallelism
  _TOKENIZER = pipeline.load_tokenizer(tokenizer_dir)


def _parse(chunk: list[tuple[str, Any]]) -> tuple[list[tuple[str, Optional[dict]]], list[tuple[str, str]]]:
  out, errors = [], []
  for where, record in chunk:
    if isinstance(record, str):
      try:
        record = json.loads(record)
        if not isinstance(record, dict):
          raise ValueError(f"expected a JSON object, got {type(record).__name__}")
      except ValueError as e:
        errors.append((where, str(e)))
        record = None
    out.append((where, record))
  return out, errors


def shard_name(source: int, chunk: int) -> str:
  return f"s{source:03d}-{chunk:06d}"


def prepare_chunk(directory: str, settings: Settings, source: int, kind: str, chunk: int,
                  records: list[tuple[str, Any]]) -> dict[str, Any]:
  """Tokenizes, splits, packs and writes one chunk into `directory`; returns (and writes last) its counts."""
  parsed, errors = _parse(records)
  usable = [(i, item) for i, item in enumerate(parsed) if item[1] is not None]
  make = tokenize.sft_examples if settings.format == "sft" else tokenize.text_examples
  examples, bad = make([item for _, item in usable], _TOKENIZER)
  if bad and errors:  # in record order
    position = {where: i for i, (where, _) in enumerate(records)}
    errors = sorted(errors + bad, key=lambda e: position[e[0]])
  else:
    errors = errors + bad
  if errors and settings.on_error == "raise":
    raise pipeline.DataError(f"{errors[0][0]}: {errors[0][1]}")
  is_val = (np.ones(len(records), bool) if kind == "val" else
            np.random.default_rng([settings.seed, source, chunk]).random(len(records)) < settings.val_fraction)
  splits = {"train": [], "val": []}
  for (i, _), example in zip(usable, examples):
    if example is not None:
      splits["val" if is_val[i] else "train"].append(example)
  counts = {"records": len(records), "malformed": len(errors), "errors": [f"{w}: {r}" for w, r in errors]}
  for split, split_examples in splits.items():
    if settings.format == "text":
      split_examples = pipeline.chunk_examples(split_examples, settings.seq_len)
    stats = pipeline.ReadStats()
    rows = list(pipeline.pack_groups(split_examples, settings.seq_len, max_loss_tokens=settings.max_loss_tokens,
                                     stats=stats, window=PACK_WINDOW))
    if rows:
      _write_shard(os.path.join(directory, split, shard_name(source, chunk) + ".array_record"), rows)
    counts[split] = {"examples": len(split_examples), "truncated": stats.truncated, "rows": len(rows),
                     "positions": sum(len(ex.tokens) - 1 for row in rows for ex in row),
                     "trained_tokens": sum(sum(ex.loss_mask[1:]) for row in rows for ex in row)}
  _write_json(os.path.join(directory, "chunks", shard_name(source, chunk) + ".json"), counts)
  return counts


def _write_shard(path: str, rows: list[list[pipeline.Example]]):
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top

  writer = ArrayRecordWriter(path + ".tmp", prepared_lib.WRITER_OPTIONS)
  for row in rows:
    writer.write(prepared_lib.encode_row(row))
  writer.close()
  os.replace(path + ".tmp", path)


def _write_json(path: str, value: Any):
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(value, f, indent=1, sort_keys=True)
  os.replace(path + ".tmp", path)


def _worker_chunk(args):
  return prepare_chunk(*args)


# ---- the job ---------------------------------------------------------------------------------------------


def workers(setting: int) -> int:
  """data.workers: 0 = one per core this process may use."""
  if setting:
    return setting
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class _Progress:
  """A line every few seconds: a bar (when the record count is known), records, rates, the ETA."""

  def __init__(self, total: Optional[int], every: float = 5.0):
    self.total, self.every, self.start, self.last = total, every, time.perf_counter(), 0.0
    self.records = self.tokens = self.skipped_records = 0

  def update(self, records: int, tokens: int, skipped: bool, final: bool = False):
    self.records += records
    if skipped:
      self.skipped_records += records
    self.tokens += tokens
    now = time.perf_counter()
    if not final and now - self.last < self.every:
      return
    self.last = now
    done = self.records - self.skipped_records
    rate = done / max(now - self.start, 1e-9)
    bar = ""
    if self.total:
      filled = int(24 * min(1.0, self.records / self.total))
      bar = f"[{'#' * filled}{'.' * (24 - filled)}] "
      if rate > 0 and self.records < self.total:
        bar += f"ETA {int((self.total - self.records) / rate)} s "
    resumed = f" ({self.skipped_records:,} prepared before)" if self.skipped_records else ""
    print(f"{bar}{self.records:,}{'/' + format(self.total, ',') if self.total else ''} records{resumed}, "
          f"{rate:,.0f} records/s, {self.tokens / max(now - self.start, 1e-9):,.0f} tokens/s", flush=True)


def run(config, workdir: str) -> dict[str, Any]:
  """The prepare mode: writes the prepared dataset `data.prepared` (or finishes an interrupted one)."""
  del workdir  # the prepared directory is the output
  d = config.data
  tokenizer_dir = files_lib.stage(config.tokenizer_path or config.model_path, files_lib.cache_dir())
  n_workers = workers(d.workers)
  # the workers start (imports, tokenizer) while this process reads the settings and counts the records
  pool = multiprocessing.get_context("spawn").Pool(n_workers, _load_worker, (tokenizer_dir,)) if n_workers > 1 else None
  try:
    return _prepare(config, tokenizer_dir, pool, n_workers)
  finally:
    if pool is not None:
      pool.terminate()


def _prepare(config, tokenizer_dir: str, pool, n_workers: int) -> dict[str, Any]:
  d = config.data
  out = d.prepared
  # a bucket output is written here first (and kept until uploaded: a re-run on this machine resumes it)
  local = files_lib.local_mirror(out, files_lib.cache_dir()) + ".writing" if files_lib.is_bucket(out) else out
  sources = _sources(config)
  has_val_sources = any(s.kind == "val" for s in sources)
  settings = Settings(d.format, d.seq_len, d.max_loss_tokens, 0.0 if has_val_sources else d.val_fraction, d.seed,
                      d.on_error, tokenizer_dir)
  tokenizer = pipeline.load_tokenizer(tokenizer_dir)
  header = {"version": prepared_lib.FORMAT_VERSION, "format": d.format, "seq_len": d.seq_len,
            "max_loss_tokens": d.max_loss_tokens, "val_fraction": settings.val_fraction, "seed": d.seed,
            "on_error": d.on_error, "tokenizer": prepared_lib.tokenizer_identity(tokenizer_dir),
            "tokenizer_path": config.tokenizer_path or config.model_path,
            "chat_template": prepared_lib.chat_template(tokenizer), "chunk_records": CHUNK_RECORDS,
            "pack_window": PACK_WINDOW,
            "sources": [{"pattern": s.pattern, "kind": s.kind, "files": list(s.files)} for s in sources]}
  if files_lib.isfile(os.path.join(out, prepared_lib.MANIFEST)):
    manifest = prepared_lib.read_manifest(out)
    inputs = lambda m: json.loads(json.dumps(
        {**m, "sources": [(s["pattern"], s["kind"], s["files"]) for s in m["sources"]]}))
    changed = [key for key in header if inputs(manifest)[key] != inputs(header)[key]]
    if not changed:
      print(f"{out} is already prepared from these inputs with these settings; nothing to do", flush=True)
      return manifest
    raise pipeline.DataError(f"data.prepared={out!r} holds a dataset prepared from other inputs or settings "
                             f"({', '.join(changed)} differ); remove it or choose another directory")
  if local != out:
    _pull(out, local)
  _start(local, header)
  if local != out:
    _upload(local, out, "prepare_settings.json")
  counts = [_count(path, d.format) for s in sources for path in s.files]
  total = None if None in counts else sum(counts)
  print(f"preparing {len(sources)} source(s) ({sum(len(s.files) for s in sources)} files"
        f"{f', about {total:,} records' if total is not None else ''}) into {out}: tokenizer {tokenizer_dir}, "
        f"rows of {d.seq_len} positions, {n_workers} worker process(es)", flush=True)
  started = time.perf_counter()
  progress = _Progress(total)
  per_source = collections.defaultdict(list)
  for source_index, chunk, chunk_counts, fresh in _run_chunks(local, settings, sources, pool, n_workers, progress):
    per_source[source_index].append((chunk, chunk_counts))
    if fresh and local != out:  # in the bucket as it is done: a prepare killed with its machine resumes elsewhere
      name = shard_name(source_index, chunk)
      for split in ("train", "val"):
        if chunk_counts[split]["rows"]:
          _upload(local, out, f"{split}/{name}.array_record")
      _upload(local, out, f"chunks/{name}.json")
  manifest, errors = _manifest(header, sources, per_source)
  seconds = time.perf_counter() - started
  _finish(local, out, manifest, errors)
  _report(out, manifest, progress, seconds)
  return manifest


def _start(local: str, header: dict[str, Any]):
  """Creates the output layout, or checks that an interrupted prepare there had these settings."""
  settings_file = os.path.join(local, "prepare_settings.json")
  if os.path.isfile(settings_file):
    with open(settings_file, encoding="utf-8") as f:
      before = json.load(f)
    now = json.loads(json.dumps(header))  # as stored: tuples become lists
    if before != now:
      changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
      raise pipeline.DataError(f"{local} holds an unfinished prepare of other inputs or settings ({', '.join(changed)} "
                               "differ); remove it to start again, or run with the same settings to finish it")
    print(f"resuming the prepare in {local}", flush=True)
  for sub in ("train", "val", "chunks"):
    os.makedirs(os.path.join(local, sub), exist_ok=True)
  _write_json(settings_file, header)


def _run_chunks(local, settings, sources, pool, n_workers, progress):
  """Yields (source, chunk, counts, fresh) in order, chunks already written read back (fresh False);
  `pool` (None: this process) tokenizes, at most two chunks per worker in flight."""
  tasks = ((i, source.kind, c, records) for i, source in enumerate(sources)
           for c, records in enumerate(_chunks(source, settings.format)))
  done_file = lambda i, c: os.path.join(local, "chunks", shard_name(i, c) + ".json")
  if pool is None:
    _load_worker(settings.tokenizer_dir)
  inflight = collections.deque()  # (source, kind, chunk, records, counts or a pending result, read back)

  def finish_oldest():
    i, kind, c, n, result, read_back = inflight.popleft()
    counts = result.get() if isinstance(result, multiprocessing.pool.AsyncResult) else result
    tokens = sum(counts[split]["positions"] + counts[split]["examples"] for split in ("train", "val"))
    progress.update(n, tokens, skipped=read_back)
    return i, c, counts, not read_back

  for i, kind, c, records in tasks:
    if os.path.isfile(done_file(i, c)):
      with open(done_file(i, c), encoding="utf-8") as f:
        inflight.append((i, kind, c, len(records), json.load(f), True))
    elif pool is None:
      inflight.append((i, kind, c, len(records), prepare_chunk(local, settings, i, kind, c, records), False))
    else:
      inflight.append((i, kind, c, len(records),
                       pool.apply_async(_worker_chunk, ((local, settings, i, kind, c, records),)), False))
    while len(inflight) > 2 * n_workers or (
        inflight and not isinstance(inflight[0][4], multiprocessing.pool.AsyncResult)):
      yield finish_oldest()
  while inflight:
    yield finish_oldest()
  progress.update(0, 0, False, final=True)


def _manifest(header, sources, per_source) -> tuple[dict[str, Any], list[str]]:
  """(the manifest, every malformed record as "where: reason")."""
  manifest = dict(header, sources=[])
  errors, malformed = [], 0
  for i, source in enumerate(sources):
    chunks = sorted(per_source.get(i, []))
    entry = {"pattern": source.pattern, "kind": source.kind, "files": list(source.files),
             "records": sum(c["records"] for _, c in chunks), "malformed": sum(c["malformed"] for _, c in chunks)}
    for split in ("train", "val"):
      entry[f"{split}_shards"] = [f"{split}/{shard_name(i, n)}.array_record" for n, c in chunks if c[split]["rows"]]
      for key in ("examples", "truncated", "rows", "positions", "trained_tokens"):
        entry[f"{split}_{key}"] = sum(c[split][key] for _, c in chunks)
    manifest["sources"].append(entry)
    malformed += entry["malformed"]
    errors += [e for _, c in chunks for e in c["errors"]]
  manifest["malformed"] = malformed
  manifest["malformed_first"] = errors[:SHOWN_ERRORS]
  return manifest, errors


def _finish(local: str, out: str, manifest: dict[str, Any], errors: list[str]):
  with open(os.path.join(local, "malformed.txt"), "w", encoding="utf-8") as f:
    f.write("".join(e + "\n" for e in errors))
  os.remove(os.path.join(local, "prepare_settings.json"))
  _write_json(os.path.join(local, prepared_lib.MANIFEST), manifest)
  if local != out:  # a bucket holds the chunks already: the list of malformed records, then the manifest
    _upload(local, out, "malformed.txt")
    _upload(local, out, prepared_lib.MANIFEST)
    files_lib.remove(os.path.join(out, "prepare_settings.json"))
    shutil.rmtree(local)


def _upload(local: str, out: str, relative: str):
  with open(os.path.join(local, relative), "rb") as src, files_lib.open_file(os.path.join(out, relative), "wb") as dst:
    dst.write(src.read())


def _pull(out: str, local: str):
  """Makes `local` agree with the bucket `out` on which chunks are done: the bucket's unfinished prepare
  (settings, finished chunks' counts; its shards stay there) comes down, so a prepare killed with its
  machine resumes on another; a chunk finished here but never uploaded is done again."""
  remote_chunks = files_lib.glob(os.path.join(out, "chunks", "*.json"))
  names = {os.path.basename(r) for r in remote_chunks}
  chunks = os.path.join(local, "chunks")
  for name in os.listdir(chunks) if os.path.isdir(chunks) else []:
    if name not in names:
      os.remove(os.path.join(chunks, name))
  if not files_lib.isfile(os.path.join(out, "prepare_settings.json")):
    return
  os.makedirs(chunks, exist_ok=True)
  for remote in [os.path.join(out, "prepare_settings.json")] + remote_chunks:
    with files_lib.open_file(remote, "rb") as src, open(os.path.join(local, remote[len(out) + 1:]), "wb") as dst:
      dst.write(src.read())


def _report(out: str, manifest: dict[str, Any], progress: _Progress, seconds: float):
  total = lambda key: sum(s[key] for s in manifest["sources"])
  rows, positions = total("train_rows"), total("train_positions")
  examples = total("train_examples") + total("val_examples")
  done = progress.records - progress.skipped_records
  print(f"prepared {total('records'):,} records in {seconds:.1f} s ({done / max(seconds, 1e-9):,.0f} records/s, "
        f"{progress.tokens / max(seconds, 1e-9):,.0f} tokens/s this run): {examples:,} examples; train "
        f"{rows:,} rows ({positions / max(rows * manifest['seq_len'], 1):.0%} filled, "
        f"{total('train_trained_tokens'):,} trained tokens), validation {total('val_rows'):,} rows; "
        f"{total('train_truncated') + total('val_truncated'):,} truncated", flush=True)
  for i, source in enumerate(manifest["sources"]):
    print(f"  source {i} ({source['kind']}) {source['pattern']}: {source['records']:,} records, "
          f"{source['train_rows']:,} train rows, {source['val_rows']:,} validation rows", flush=True)
  if manifest["malformed"]:
    shown = "; ".join(manifest["malformed_first"][:5])
    print(f"{manifest['malformed']:,} malformed records skipped (data.on_error=raise stops at the first): {shown}"
          f"{'; ...' if manifest['malformed'] > 5 else ''} (all in {os.path.join(out, 'malformed.txt')})",
          flush=True)
  print(f"train from it with --config.data.prepared={out}", flush=True)
  sys.stdout.flush()
