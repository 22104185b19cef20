"""Paths as a user gives them: relative (resolved once against the current directory), `~`, Hugging Face
model ids (through the hub's cache), and bucket paths (refused with one message naming the field)."""

import os

import pytest

from conftest import load_config
from phds_jax import errors
from phds_jax import main
from phds_jax.io import checkpoint, paths


def _hub_cache(root, repo_id, files):
  """A Hugging Face hub cache holding one snapshot of `repo_id` (the layout huggingface_hub reads)."""
  repo = root / ("models--" + repo_id.replace("/", "--"))
  snapshot = repo / "snapshots" / "0123abcd"
  snapshot.mkdir(parents=True)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text("0123abcd")
  for name, source in files.items():
    (snapshot / name).write_bytes(open(source, "rb").read())
  return str(snapshot)


def test_relative_paths_resolve_once_against_the_current_directory(hf_dirs, tmp_path, monkeypatch):
  src, _ = hf_dirs["mixtral_gqa"]
  monkeypatch.chdir(tmp_path)
  os.symlink(src, "model")
  config = load_config("convert", **{"model_path": "model", "convert.dst": "out/orbax"})
  out = main.run(config, "work")  # a relative workdir too
  assert out == str(tmp_path / "out" / "orbax") and os.path.isfile(os.path.join(out, checkpoint.CONFIG_FILE))
  resolved, workdir = paths.resolve_config(load_config("olmoe", **{
      "data.train_files": "a/*.jsonl, b.jsonl", "eval.compare": "base=m1,phds=~/m2"}), "w")
  assert workdir == str(tmp_path / "w")
  assert resolved.data.train_files == f"{tmp_path}/a/*.jsonl,{tmp_path}/b.jsonl"
  assert resolved.eval.compare == f"base={tmp_path}/m1,phds={os.path.expanduser('~/m2')}"


def test_model_ids_resolve_through_the_hub_cache(hf_dirs, tmp_path, monkeypatch):
  import huggingface_hub

  src, _ = hf_dirs["olmoe_gqa_clip_norm"]
  cache = tmp_path / "hub"
  files = {n: os.path.join(src, n) for n in os.listdir(src) if os.path.isfile(os.path.join(src, n))}
  snapshot = _hub_cache(cache, "allenai/Tiny-MoE", files)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  assert paths.resolve_model("allenai/Tiny-MoE") == snapshot
  config, _ = paths.resolve_config(load_config("eval", **{"model_path": "allenai/Tiny-MoE"}))
  assert config.model_path == snapshot
  with pytest.raises(errors.PathError, match=r"model_path='allenai/Other' is neither a local directory nor in "
                                             r"the Hugging Face cache .* fetch it first with: hf download"):
    paths.resolve_model("allenai/Other")

