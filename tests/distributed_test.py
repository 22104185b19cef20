"""Multi-process training on JAX's runtime: two CPU processes (2 devices each, coordinator on 127.0.0.1,
gloo collectives) train like one process, write outputs from process 0 only, read only their own blocks
of the model and of the prepared data, stop together at one step when only one of them is preempted
(SIGTERM), and leave checkpoints (data position included) a one-process run on another number of devices
resumes."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import ml_collections
import pytest

import phds_jax as pj
from conftest import ROOT, toy_train_config
from phds_jax import main
from phds_jax.cli import configs
from phds_jax.io import load as load_lib

# argv: config JSON, workdir, process id, process count, coordinator port. Prints one JSON line.
_WORKER = textwrap.dedent("""
    import json, sys
    import ml_collections
    with open(sys.argv[1]) as f:
      config = ml_collections.ConfigDict(json.load(f))
    process_id, processes = int(sys.argv[3]), int(sys.argv[4])
    config.distributed.enabled = True
    config.distributed.coordinator_address = f"127.0.0.1:{sys.argv[5]}"
    config.distributed.num_processes, config.distributed.process_id = processes, process_id
    from phds_jax.io.hf import safetensors_io
    read = []
    original = safetensors_io.SafetensorsFile.get
    def counting(self, name, index=None):
      out = original(self, name, index)
      read.append(out.nbytes)
      return out
    safetensors_io.SafetensorsFile.get = counting
    from phds_jax import main
    from phds_jax.train import loop as train
    if len(sys.argv) > 6 and process_id == 1:  # a scheduler's SIGTERM to process 1 only, after a given step
      import os, signal, time
      original_step = train.Trainer.train_step
      def train_step(self, state, batch, k):
        state, stats = original_step(self, state, batch, k)
        if int(state["step"]) == int(sys.argv[6]):
          os.kill(os.getpid(), signal.SIGTERM)
          time.sleep(1)  # the notice reaches the other process before the next step's sync point
        return state, stats
      train.Trainer.train_step = train_step
    summary = main.run(config, sys.argv[2])
    import jax
    print(json.dumps({"processes": jax.process_count(), "devices": jax.device_count(),
                      "local_devices": jax.local_device_count(), "bytes_read": sum(read),
                      "train_loss": summary["train_loss"], "history": summary["history"],
                      "stopped_by": summary["stopped_by"]}))
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(config_path, workdir, process_id, processes, port, devices, sigterm_after=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}")
  args = [str(config_path), str(workdir), str(process_id), str(processes), str(port)]
  args += [str(sigterm_after)] if sigterm_after is not None else []
  return subprocess.Popen([sys.executable, "-c", _WORKER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env)


def _result(proc) -> dict:
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1])


def _stop_step(runs: list[dict]) -> int:
  return len(runs[0]["train_loss"])


def _close(a: dict, b: dict):
  assert a.keys() == b.keys(), (a, b)
  for key in a:
    assert abs(a[key] - b[key]) <= 1e-5, (key, a[key], b[key])


def _in_this_process(config_path, workdir) -> dict:
  """The run of the config JSON on this process's one device, as `_WORKER` reports it (bytes read from
  safetensors counted)."""
  from phds_jax import main
  from phds_jax.io.hf import safetensors_io
  read, original = [], safetensors_io.SafetensorsFile.get

  def counting(self, name, index=None):
    out = original(self, name, index)
    read.append(out.nbytes)
    return out
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(safetensors_io.SafetensorsFile, "get", counting)
    summary = main.run(ml_collections.ConfigDict(json.loads(config_path.read_text())), str(workdir))
  return {"processes": jax.process_count(), "devices": jax.device_count(), "bytes_read": sum(read),
          "train_loss": {str(k): v for k, v in summary["train_loss"].items()}, "history": summary["history"],
          "stopped_by": summary["stopped_by"]}


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
  """The same 4-step job on 2 processes x 2 devices (process 1 gets SIGTERM after step 1: a preemption) and
  in this process (one device: sharding changes nothing, tests/train_test.py checks it on 8), then the
  2-process workdir resumed to step 4 here: the data position of a 2-process checkpoint resumed by one
  process. Starts from an HF directory and a prepared dataset (each process reads its rows)."""
  tmp = tmp_path_factory.mktemp("distributed")
  config = toy_train_config(tmp, **{"train.steps": 4, "log_every": 1, "eval.every": 2, "mesh.data": 1,
                                    "mesh.fsdp": -1, "checkpoint.every": 2, "model.expert_backend": "reference"})
  cfg = load_lib.run_model_config(config)
  params = pj.init_params(cfg, jax.random.key(0))
  model_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  pj.hf.save_pretrained(cfg, params, str(tmp / "hf"))
  config.model_path, config.model.random_init, config.mode = str(tmp / "hf"), False, "train"
  # the data prepared once (configs/prepare.py): each process streams its rows of every batch from the shards
  prepare = configs.base_config()
  prepare.mode, prepare.tokenizer_path, prepare.data = "prepare", config.tokenizer_path, config.data.copy_and_resolve_references()
  prepare.data.prepared, prepare.data.workers = str(tmp / "prepared"), 1
  main.run(prepare)
  config.data.prepared, config.data.train_files = str(tmp / "prepared"), ""
  (tmp / "full.json").write_text(config.to_json())
  port = _free_port()
  procs = [_start(tmp / "full.json", tmp / "two", i, 2, port, 2, sigterm_after=1) for i in range(2)]
  one = _in_this_process(tmp / "full.json", tmp / "one")
  two = [_result(p) for p in procs]
  resumed = _in_this_process(tmp / "full.json", tmp / "two")
  return {"two": two, "one": one, "resumed": resumed, "model_bytes": model_bytes, "dirs": tmp}


def _two_processes_train_like_one_with_the_same_devices(two_process_runs):
  two, one = two_process_runs["two"], two_process_runs["one"]
  assert [(r["processes"], r["devices"], r["local_devices"]) for r in two] == [(2, 4, 2)] * 2
  assert (one["processes"], one["devices"]) == (1, 1)
  # both processes stop at the same step, before the end, though only process 1 was signalled
  assert [r["stopped_by"] for r in two] == ["preemption"] * 2
  assert list(two[0]["train_loss"]) == list(two[1]["train_loss"]) == [str(s) for s in range(1, _stop_step(two) + 1)]
  assert 1 <= _stop_step(two) < 4
  for r in two:  # every process computes the same global losses
    _close(r["train_loss"], {s: one["train_loss"][s] for s in r["train_loss"]})
    for a, b in zip(r["history"], one["history"]):
      _close(a, b)


def _each_process_reads_only_its_devices_blocks(two_process_runs):
  """mesh fsdp=4: a process holds half of every sharded parameter (and all of the few replicated ones)."""
  model_bytes = two_process_runs["model_bytes"]
  for r in two_process_runs["two"]:
    assert 0.4 * model_bytes < r["bytes_read"] < 0.6 * model_bytes, (r["bytes_read"], model_bytes)
  assert two_process_runs["one"]["bytes_read"] >= model_bytes


def _a_two_process_checkpoint_resumes_in_one_process(two_process_runs):
  resumed, one = two_process_runs["resumed"], two_process_runs["one"]
  rest = [str(s) for s in range(_stop_step(two_process_runs["two"]) + 1, 5)]
  assert list(resumed["train_loss"]) == rest
  _close(resumed["train_loss"], {s: one["train_loss"][s] for s in rest})
  _close(resumed["history"][-1], one["history"][-1])  # validation at step 4: the final parameters agree


def _only_process_zero_writes_outputs(two_process_runs):
  workdir = two_process_runs["dirs"] / "two"
  history = [json.loads(line) for line in (workdir / "eval_history.jsonl").read_text().splitlines()]
  assert [h["step"] for h in history] == [0, 2, 4]  # one line per evaluation: 0 and 2 (two processes), 4
  assert len(os.listdir(workdir / "tensorboard")) == 2  # one event file per run: 2-process and resumed


@pytest.mark.slow
def test_two_processes(two_process_runs):
  """One test over the runs (pytest-xdist would otherwise start them again on a second worker)."""
  _two_processes_train_like_one_with_the_same_devices(two_process_runs)
  _each_process_reads_only_its_devices_blocks(two_process_runs)
  _a_two_process_checkpoint_resumes_in_one_process(two_process_runs)
  _only_process_zero_writes_outputs(two_process_runs)
