"""Every path a user gives, resolved once at the start of a run, and where a run's files go.

A path may be absolute, relative (to the directory the command was started in: resolved once, so a
library that changes directory or insists on absolute paths, like orbax, never sees a relative one),
`~`-prefixed, a bucket path (`gs://bucket/...`, read and written through `io/files.py`), or a Hugging Face
model id (`allenai/OLMoE-1B-7B-0125`) for the fields that name a model: the id resolves to its snapshot in
the Hugging Face cache, downloaded once when the hub is reachable. A model in a bucket is copied once into
the local cache (safetensors are memory-mapped and tokenizers read local files); data files are streamed
from the bucket; the workdir stays in the bucket (orbax writes its checkpoints there).
"""

from __future__ import annotations

import os
import re
from typing import Any, Optional

from phds_jax.errors import PathError
from phds_jax.io import files

# fields naming one directory or file; fields naming models may also be Hugging Face model ids
DIR_FIELDS = ("workdir", "convert.dst", "builtin.cache", "data.prepared")
LOCAL_FIELDS = ("builtin.cache",)  # caches this machine reads and writes with local file APIs
MODEL_FIELDS = ("model_path", "tokenizer_path")
# fields holding comma-separated files or glob patterns
LIST_FIELDS = ("data.train_files", "data.val_files", "eval.task_files", "eval.text_files", "eval.sft_files")

_MODEL_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_model_id(path: str) -> bool:
  """`org/name` that is no existing local path: how the Hugging Face hub names a model."""
  return bool(_MODEL_ID.fullmatch(path)) and not os.path.exists(path) and not path.startswith(".")


def resolve(path: str, field: str = "path") -> str:
  """An absolute local path, or a bucket path as given (without a trailing "/"); "" stays ""."""
  if not path:
    return path
  if files.is_bucket(path):
    if not path.startswith("gs://"):
      raise PathError(f"{field}={path!r}: the only bucket scheme supported is gs://")
    if field in LOCAL_FIELDS:
      raise PathError(f"{field}={path!r} is a local cache; give a local directory")
    return path.rstrip("/")
  return os.path.abspath(os.path.expanduser(path))


def resolve_model(path: str, field: str = "model_path") -> str:
  """A local model directory: `path` resolved, a bucket directory's copy in the local cache, or the Hugging
  Face cache's snapshot of a model id (its cache first; downloaded when not cached and the hub is
  reachable)."""
  if files.is_bucket(path):
    return files.stage(resolve(path, field), files.cache_dir())
  if not is_model_id(path):
    return resolve(path, field)
  import huggingface_hub  # pylint: disable=g-import-not-at-top  (transformers' dependency)
  from huggingface_hub import errors as hub_errors  # pylint: disable=g-import-not-at-top

  try:
    return huggingface_hub.snapshot_download(path, local_files_only=True)
  except hub_errors.LocalEntryNotFoundError:
    pass
  if huggingface_hub.constants.HF_HUB_OFFLINE:
    raise PathError(f"{field}={path!r} is neither a local directory nor in the Hugging Face cache "
                    f"({huggingface_hub.constants.HF_HUB_CACHE}) and the hub is offline (HF_HUB_OFFLINE=1); "
                    f"fetch it first with: hf download {path}")
  print(f"downloading {path} from the Hugging Face hub into {huggingface_hub.constants.HF_HUB_CACHE} ...",
        flush=True)
  try:
    return huggingface_hub.snapshot_download(path)
  except Exception as e:  # pylint: disable=broad-except  (network, authentication, unknown repository)
    raise PathError(f"{field}={path!r}: not a local directory, and the Hugging Face hub could not give it "
                    f"({type(e).__name__}: {e})") from None


def resolve_list(value: str, field: str) -> str:
  """Comma-separated files or glob patterns, each made absolute (hf:NAME, a datasets cache entry: data/
  pipeline.HUB, as given)."""
  return ",".join(p.strip() if p.strip().startswith("hf:") else resolve(p.strip(), field)
                  for p in value.split(",") if p.strip())


def resolve_compare(value: str) -> str:
  """`eval.compare` entries `label=path`, each path resolved (a malformed entry is left for the checks)."""
  out = []
  for entry in (e.strip() for e in value.split(",") if e.strip()):
    label, sep, path = entry.partition("=")
    out.append(f"{label.strip()}={resolve_model(path.strip(), f'eval.compare[{label.strip()}]')}" if sep else entry)
  return ",".join(out)


def resolve_config(config, workdir: Optional[str] = None) -> tuple[Any, Optional[str]]:
  """(config with every path field resolved, workdir resolved); PathError naming the first bad field.

  Fields a config does not have (e.g. `builtin.cache` outside the built-in run) are skipped.
  """
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for field in DIR_FIELDS + MODEL_FIELDS + LIST_FIELDS:
      node, name = _node(config, field)
      if node is None or not node[name]:
        continue
      if field in MODEL_FIELDS:
        node[name] = resolve_model(node[name], field)
      elif field in LIST_FIELDS:
        node[name] = resolve_list(node[name], field)
      else:
        node[name] = resolve(node[name], field)
    if config.get("eval") is not None and config.eval.get("compare"):
      config.eval.compare = resolve_compare(config.eval.compare)
  return config, resolve(workdir, "--workdir") if workdir else workdir


def _node(config, dotted: str):
  *parents, name = dotted.split(".")
  node = config
  for p in parents:
    node = node.get(p) if hasattr(node, "get") else None
    if node is None:
      return None, name
  return (node, name) if name in node else (None, name)


def write_resolved(config, workdir: str):
  """Writes `workdir/config.json`, the resolved config of this run (process 0 only)."""
  import jax  # pylint: disable=g-import-not-at-top  (path resolution alone needs no jax)

  if jax.process_index() == 0:
    files.makedirs(workdir)
    files.write_text(os.path.join(workdir, "config.json"), config.to_json(indent=2))
