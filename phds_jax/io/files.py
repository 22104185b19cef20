"""File operations on a local path or a bucket path (`gs://bucket/...`), one API for both.

Local paths use the standard library. Bucket paths go through fsspec with gcsfs (the `[gcs]` extra; the
`[tpu]` extra has it too); orbax and tensorstore read and write buckets themselves, so checkpoints never
pass through here. What needs a local file (safetensors' memory map, a tokenizer, the data readers) gets
one through `stage`: a bucket file or directory is copied once into the local cache.

Renaming a directory in a bucket (`rename`) is not atomic the way a local rename is: its objects are
copied, then deleted, so a process killed in between leaves both copies (io/checkpoint.py's
`recover_replaced` cleans up after one).
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import hashlib
import json
import os
import shutil
from typing import IO, Any, Callable, Iterator

from phds_jax.errors import PathError


def cache_dir() -> str:
  """Where phds_jax keeps what it makes or copies once per machine: $PHDS_CACHE or ~/.cache/phds_jax."""
  return os.environ.get("PHDS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "phds_jax"))


@contextlib.contextmanager
def exclusive(lock_path: str) -> Iterator[None]:
  """Holds an exclusive lock on `lock_path` (POSIX flock) for the block: one process at a time."""
  with open(lock_path, "a", encoding="utf-8") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def write_jsonl(path: str, records: list[dict[str, Any]]):
  """Writes `records` as JSON lines to the local `path` (via a partial file: readers never see half of it)."""
  tmp = path + ".partial"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  os.replace(tmp, path)


def is_bucket(path: str) -> bool:
  return "://" in path


_BUCKETS_OFF: contextvars.ContextVar[bool] = contextvars.ContextVar("phds_buckets_off", default=False)


@contextlib.contextmanager
def buckets_elsewhere() -> Iterator[None]:
  """Within the block a bucket path is not looked at (PathError): what checks a job's config on a machine
  other than where the job runs (phds-launch) uses it, since that machine may have neither the network nor
  the credentials the job has."""
  token = _BUCKETS_OFF.set(True)
  try:
    yield
  finally:
    _BUCKETS_OFF.reset(token)


def _fs(path: str):
  """(fsspec filesystem, path inside it) for a bucket path; listings are never cached, since orbax and
  tensorstore write the same bucket behind fsspec's back."""
  if _BUCKETS_OFF.get():
    raise PathError(f"{path}: a bucket path, not looked at from this machine")
  try:
    import fsspec  # pylint: disable=g-import-not-at-top  (an orbax dependency)

    return fsspec.core.url_to_fs(path, use_listings_cache=False, skip_instance_cache=False)
  except (ImportError, ValueError) as e:
    raise PathError(f"{path}: this bucket needs its fsspec backend; install it with "
                    f"pip install 'phds_jax[gcs]' ({e})") from None


def _ask(path: str, local: Callable[[str], bool], method: str) -> bool:
  """`local(path)` for a local path, the fsspec filesystem's `method` for a bucket path."""
  if not is_bucket(path):
    return local(path)
  fs, inner = _fs(path)
  return getattr(fs, method)(inner)


def exists(path: str) -> bool:
  return _ask(path, os.path.exists, "exists")


def isdir(path: str) -> bool:
  return _ask(path, os.path.isdir, "isdir")


def isfile(path: str) -> bool:
  return _ask(path, os.path.isfile, "isfile")


def makedirs(path: str) -> None:
  """Local: the directory and its parents. Buckets have no directories: nothing to do."""
  if not is_bucket(path):
    os.makedirs(path, exist_ok=True)


@contextlib.contextmanager
def open_file(path: str, mode: str = "r") -> Iterator[IO]:
  """A file object for reading or writing (a bucket object is written when the file closes)."""
  if not is_bucket(path):
    with open(path, mode, encoding=None if "b" in mode else "utf-8") as f:
      yield f
    return
  fs, inner = _fs(path)
  with fs.open(inner, mode) as f:
    yield f


def read_text(path: str) -> str:
  with open_file(path) as f:
    return f.read()


def write_text(path: str, text: str) -> None:
  """Writes `text` whole: locally through a temporary file and a rename; a bucket object is replaced in one
  request. A reader never sees half a file."""
  if is_bucket(path):
    with open_file(path, "w") as f:
      f.write(text)
    return
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path + ".partial", "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(path + ".partial", path)


def remove(path: str) -> None:
  """Removes a file or a directory tree; a missing path is no error."""
  if not is_bucket(path):
    if os.path.isdir(path):
      shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
      os.remove(path)
    return
  fs, inner = _fs(path)
  if fs.exists(inner):
    fs.rm(inner, recursive=True)


def rename(src: str, dst: str) -> None:
  """Moves a file or a directory tree (`dst` must not exist)."""
  if not is_bucket(src):
    os.rename(src, dst)
    return
  fs, inner = _fs(src)
  fs.copy(inner, _fs(dst)[1], recursive=fs.isdir(inner))  # server-side copies, then the deletes
  fs.rm(inner, recursive=True)


def listdir(path: str) -> list[str]:
  """Names (not paths) in a directory, sorted."""
  if not is_bucket(path):
    return sorted(os.listdir(path))
  fs, inner = _fs(path)
  return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(inner, detail=False))


def glob(pattern: str) -> list[str]:
  """Paths matching a glob pattern, sorted (bucket matches keep their `gs://` prefix)."""
  if not is_bucket(pattern):
    import glob as glob_lib  # pylint: disable=g-import-not-at-top

    return sorted(glob_lib.glob(pattern))
  fs, inner = _fs(pattern)
  protocol = pattern.split("://", 1)[0]
  return sorted(f"{protocol}://{p}" for p in fs.glob(inner))


def upload_dir(local_dir: str, dst: str) -> None:
  """Copies a local directory tree to `dst` (a bucket or local path), file by file."""
  if not is_bucket(dst):
    shutil.copytree(local_dir, dst, dirs_exist_ok=True)
    return
  fs, inner = _fs(dst)
  for root, _, names in os.walk(local_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), local_dir)
      fs.put_file(os.path.join(root, name), f"{inner}/{rel}")


def local_mirror(path: str, cache: str) -> str:
  """Where a bucket path's local counterpart lives: `cache/buckets/<hash of path>/<its name>`."""
  key = hashlib.sha256(path.encode()).hexdigest()[:12]
  return os.path.join(cache, "buckets", key, os.path.basename(path.rstrip("/")))


def stage(path: str, cache: str) -> str:
  """A local copy of `path`: the path itself when local; a bucket file or directory is downloaded once into
  `cache/buckets/...` (a `.complete` marker records a finished copy, so an interrupted one is redone)."""
  if not is_bucket(path):
    return path
  fs, inner = _fs(path)
  local = local_mirror(path, cache)
  marker = local + ".complete"
  if os.path.isfile(marker):
    return local
  if not fs.exists(inner):
    raise PathError(f"{path}: no such file or directory in the bucket")
  print(f"copying {path} to {local} ...", flush=True)
  shutil.rmtree(local, ignore_errors=True)
  if fs.isdir(inner):
    for name in fs.find(inner):
      target = os.path.join(local, os.path.relpath(name, inner))
      os.makedirs(os.path.dirname(target), exist_ok=True)
      fs.get_file(name, target)
  else:
    os.makedirs(os.path.dirname(local), exist_ok=True)
    fs.get_file(inner, local)
  with open(marker, "w", encoding="utf-8") as f:
    f.write(path)
  return local
