"""Bucket paths: a run whose workdir, model, tokenizer and data are all in gs:// trains, resumes and exports.

The bucket is a GCS emulator (the gcp-storage-emulator package) on loopback, in memory: gcsfs finds it
through STORAGE_EMULATOR_HOST, tensorstore (under orbax) through TENSORSTORE_GCS_HTTP_URL. No network.
"""

import json
import logging
import pathlib
import shutil
import socket

from gcp_storage_emulator import server as emulator
from gcp_storage_emulator.handlers import objects as emulator_objects
import jax
import numpy as np
import pytest

from phds_jax.cli import modes
from phds_jax.errors import ConfigProblems, PathError
from phds_jax.io import files
from phds_jax.io import hf
from phds_jax.io import load as load_lib
from phds_jax.io import paths
from phds_jax.model.transformer import init_params
from conftest import load_config, set_fields, toy_train_config

BUCKET = "gs://phds-test"


_DOWNLOAD = emulator_objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  """The emulator's object download plus the x-goog-generation headers real GCS sends: tensorstore reads them
  when it opens an existing OCDBT manifest (without them: "Malformed StorageGeneration")."""
  _DOWNLOAD(request, response, storage, *args, **kwargs)
  if response.status.value in (200, 206):  # whole objects and byte ranges
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"], response["x-goog-metageneration"] = obj["generation"], obj["metageneration"]


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
  """An emulated bucket; PHDS_CACHE points at a fresh directory so staged copies start cold."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(emulator_objects, "download", _download_with_generation)  # objects.get?alt=media calls it
    for _, handlers in emulator.HANDLERS:
      if handlers.get(emulator.GET) is _DOWNLOAD:
        mp.setitem(handlers, emulator.GET, _download_with_generation)
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET[5:])
    server.start()
    url = f"http://127.0.0.1:{port}"
    mp.setenv("STORAGE_EMULATOR_HOST", url)
    mp.setenv("TENSORSTORE_GCS_HTTP_URL", url)
    mp.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    mp.setenv("PHDS_CACHE", str(tmp_path_factory.mktemp("cache")))
    mp.setattr(logging.getLogger("gcsfs"), "level", logging.ERROR)  # "no default credentials": none needed
    yield BUCKET
    server.stop()


def _upload(local_path, remote):
  with open(local_path, "rb") as src, files.open_file(remote, "wb") as dst:
    dst.write(src.read())


def test_files_api_in_a_bucket(bucket):
  root = f"{bucket}/api"
  files.write_text(f"{root}/a/x.txt", "one")
  files.write_text(f"{root}/a/y.json", "two")
  assert files.isfile(f"{root}/a/x.txt") and files.isdir(f"{root}/a") and not files.exists(f"{root}/b")
  assert files.listdir(f"{root}/a") == ["x.txt", "y.json"]
  assert files.glob(f"{root}/a/*.txt") == [f"{root}/a/x.txt"]
  files.rename(f"{root}/a", f"{root}/b")
  assert not files.exists(f"{root}/a") and files.read_text(f"{root}/b/y.json") == "two"
  local = files.stage(f"{root}/b", files.cache_dir())
  assert sorted(p.name for p in pathlib.Path(local).iterdir()) == ["x.txt", "y.json"]
  files.remove(f"{root}/b")
  assert not files.exists(f"{root}/b")
  with pytest.raises(PathError, match="no such file"):
    files.stage(f"{root}/missing", files.cache_dir())


@pytest.mark.slow
def test_a_bucket_run_trains_resumes_and_exports(bucket, tmp_path, capsys):
  local = toy_train_config(tmp_path)
  cfg = load_lib.run_model_config(local)
  hf.save_pretrained(cfg, init_params(cfg, jax.random.key(0)), f"{bucket}/model")  # uploaded from a temp dir
  files.upload_dir(local.tokenizer_path, f"{bucket}/tok")
  _upload(local.data.train_files, f"{bucket}/data/sft.jsonl")
  changes = {"model_path": f"{bucket}/model", "tokenizer_path": f"{bucket}/tok", "model.random_init": False,
             "data.train_files": f"{bucket}/data/*.jsonl", "train.steps": 6, "eval.every": 3,
             "checkpoint.every": 3, "log_every": 3, "export_hf": True, "compile_cache": ""}
  workdir = f"{bucket}/run"
  first = modes.run(toy_train_config(tmp_path, **changes, **{"train.stop_at": 3}), workdir)
  assert first["steps"] == 3 and first["stopped_by"] == "train.stop_at"
  assert not files.exists(f"{workdir}/hf_export")
  second = modes.run(toy_train_config(tmp_path, **changes), workdir)
  out = capsys.readouterr().out
  assert f"resumed from {workdir}/checkpoints at step 3" in out, out
  assert second["steps"] == 6 and [h["step"] for h in second["history"]] == [0, 3, 6]
  stored = json.loads(files.read_text(f"{workdir}/summary.json"))
  assert stored["steps"] == 6 and stored["best_step"] == second["best_step"]
  assert [json.loads(line)["step"] for line in files.read_text(f"{workdir}/eval_history.jsonl").splitlines()] \
      == [0, 3, 6]
  assert files.isfile(f"{workdir}/config.json") and files.listdir(f"{workdir}/tensorboard")
  best_cfg, best = load_lib.load(f"{workdir}/best")  # orbax restores from the bucket (through a staged copy)
  export_cfg, exported = load_lib.load(f"{workdir}/hf_export")
  assert export_cfg == best_cfg
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(best), jax.tree.leaves(exported)))
  assert files.isfile(f"{workdir}/hf_export/tokenizer.json")  # copied along from the staged tokenizer
  again = modes.run(toy_train_config(tmp_path, **changes), workdir)
  assert again["steps"] == 6 and "nothing left to do" in capsys.readouterr().out


def test_prepared_data_to_and_from_a_bucket(bucket, tmp_path, capsys):
  """configs/prepare.py reads a bucket's JSONL and tokenizer and writes the prepared dataset into the bucket
  (manifest last); a run reads it back through a local copy, copied again when the bucket's is prepared anew."""
  from phds_jax.data import prepared

  local = toy_train_config(tmp_path)
  files.upload_dir(local.tokenizer_path, f"{bucket}/ptok")
  _upload(local.data.train_files, f"{bucket}/pdata/sft.jsonl")
  out = f"{bucket}/prepared"
  config = load_config("prepare", **{"tokenizer_path": f"{bucket}/ptok", "data.train_files": f"{bucket}/pdata/*.jsonl",
                                     "data.prepared": out, "data.seq_len": 64, "data.workers": 1})
  modes.run(config)
  assert "train from it with --config.data.prepared=gs://phds-test/prepared" in capsys.readouterr().out
  manifest = prepared.read_manifest(out)
  assert files.isfile(f"{out}/{manifest['sources'][0]['train_shards'][0]}")
  directory = prepared.local_copy(out)
  (rows,) = prepared.train_sources(directory, manifest, mixture=False)
  source = manifest["sources"][0]
  assert len(rows) == source["train_rows"] and source["train_examples"] + source["val_examples"] == 300
  assert sum(int(rows[i]["segment_ids"].max()) for i in range(len(rows))) == source["train_examples"]
  files.remove(out)
  modes.run(set_fields(config, **{"data.seq_len": 32}))
  assert prepared.read_manifest(prepared.local_copy(out))["seq_len"] == 32  # the new one, not the old copy


def _bucket_contents(root):
  out = {}
  for path in files.glob(f"{root}/*") + files.glob(f"{root}/*/*"):
    if files.isfile(path):
      with files.open_file(path, "rb") as f:
        out[path[len(root):]] = f.read()
  return out


def test_a_prepare_killed_with_its_machine_resumes_from_the_bucket(bucket, tmp_path, monkeypatch, capsys):
  """Chunks go up to the bucket as they finish: a prepare killed after two, whose local files are lost (a
  new machine), continues from the bucket and ends with the bytes of an uninterrupted one."""
  from phds_jax.data import prepare

  monkeypatch.setattr(prepare, "CHUNK_RECORDS", 64)  # 300 records: 5 chunks
  local = toy_train_config(tmp_path)
  files.upload_dir(local.tokenizer_path, f"{bucket}/rtok")
  _upload(local.data.train_files, f"{bucket}/rdata/sft.jsonl")
  config = lambda out: load_config("prepare", **{"tokenizer_path": f"{bucket}/rtok", "data.workers": 1,
                                                 "data.train_files": f"{bucket}/rdata/sft.jsonl",
                                                 "data.prepared": out, "data.seq_len": 64})
  modes.run(config(f"{bucket}/whole"))
  original, done = prepare.prepare_chunk, []

  def dies_at_the_third(*args):
    if len(done) == 2:
      raise KeyboardInterrupt
    done.append(args[4])
    return original(*args)

  monkeypatch.setattr(prepare, "prepare_chunk", dies_at_the_third)
  with pytest.raises(KeyboardInterrupt):
    modes.run(config(f"{bucket}/killed"))
  left = _bucket_contents(f"{bucket}/killed")  # what went up before the kill: two chunks, no manifest
  assert sorted(p for p in left if p.startswith(("/chunks", "/train"))) == [
      "/chunks/s000-000000.json", "/chunks/s000-000001.json",
      "/train/s000-000000.array_record", "/train/s000-000001.array_record"]
  assert "/prepare_settings.json" in left and "/manifest.json" not in left
  shutil.rmtree(files.local_mirror(f"{bucket}/killed", files.cache_dir()) + ".writing")  # another machine
  monkeypatch.setattr(prepare, "prepare_chunk", original)
  capsys.readouterr()
  modes.run(config(f"{bucket}/killed"))
  assert "(128 prepared before)" in capsys.readouterr().out
  assert _bucket_contents(f"{bucket}/killed") == _bucket_contents(f"{bucket}/whole")


def test_bucket_fields_resolve_and_local_caches_refuse_buckets(bucket, tmp_path):
  assert paths.resolve(f"{bucket}/w/") == f"{bucket}/w"
  with pytest.raises(PathError, match="builtin.cache"):
    paths.resolve(f"{bucket}/cache", "builtin.cache")
  with pytest.raises(PathError, match="only bucket scheme"):
    paths.resolve("s3://b/x", "workdir")
  config = load_config("eval", **{"model_path": str(tmp_path), "eval.text_files": f"{bucket}/none/*.txt"})
  with pytest.raises(ConfigProblems, match=r"eval.text_files: 'gs://phds-test/none/\*.txt' matches no file"):
    modes.run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
