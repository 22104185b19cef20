"""`phds-launch --dry-run` prints the exact gcloud / SLURM commands of a job and runs nothing."""

import os
import shlex
import subprocess
import sys

import pytest

from phds_jax.cli import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN_ARGS = ["--config=configs/olmoe.py", "--config.model_path=/models/OLMoE",
             "--config.data.train_files=/data/sft/*.jsonl", "--workdir=gs://b/run"]


def _commands(capsys, argv):
  assert launch.main(argv) == 0
  out = capsys.readouterr().out
  return [shlex.split(line[2:].split("  # query")[0]) for line in out.splitlines() if line.startswith("+ ")], out


def test_tpu_v5e_16_job(capsys):
  cmds, _ = _commands(capsys, ["tpu", "--name", "phds", "--zone", "us-west4-a", "--accelerator", "v5e-16",
                               "--spot", "--dry-run", "--", *MAIN_ARGS])
  assert cmds[0] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "phds", "--zone", "us-west4-a"]
  assert cmds[1] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "phds", "--accelerator-type", "v5litepod-16",
                     "--version", launch.RUNTIME["v5e"], "--spot", "--zone", "us-west4-a"]
  assert cmds[2][:4] == [sys.executable, "-m", "pip", "wheel"]
  scp = next(c for c in cmds if "scp" in c)
  assert scp[-4:] == ["phds:~/phds/", "--worker=all", "--zone", "us-west4-a"]
  assert scp[-5] == os.path.join(ROOT, "configs") and cmds[2][-1] == ROOT  # the checkout's configs and wheel
  install = next(c for c in cmds if "pip install" in c[-1])
  assert "--worker=all" in install and install[-1].endswith(".whl'[tpu]'")
  start = next(c for c in cmds if "phds_jax.main" in c[-1] and "nohup" in c[-1])
  assert "--worker=all" in start
  job = shlex.split(start[-1].split("nohup ", 1)[1].split(" >", 1)[0])
  assert job == ["python3", "-m", "phds_jax.main", *MAIN_ARGS, "--config.distributed.enabled=True"]
  assert cmds[-1][-2:] == ["--command", "tail -n +1 -f ~/phds/run.log"] and "--worker=0" in cmds[-1]


def test_tpu_two_slice_job_uses_a_queued_resource(capsys):
  cmds, out = _commands(capsys, ["tpu", "--name", "big", "--zone", "us-east5-b", "--accelerator", "v5p-32",
                                 "--num-slices", "2", "--project", "proj", "--dry-run", "--", *MAIN_ARGS])
  assert cmds[0][:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "big"]
  assert cmds[1] == ["gcloud", "compute", "tpus", "queued-resources", "create", "big", "--node-count", "2",
                     "--node-prefix", "big", "--accelerator-type", "v5p-32", "--runtime-version", launch.RUNTIME["v5p"],
                     "--zone", "us-east5-b", "--project", "proj"]
  assert "wait until" in out and "state.state" in out
  starts = [c for c in cmds if "nohup" in c[-1]]
  assert [c[5] for c in starts] == ["big-0", "big-1"]  # every slice starts the job on all its workers


@pytest.mark.parametrize("action, expected", [
    ("stop", "pkill -TERM -f phds_jax.main || true"), ("logs", "tail -n 100 ~/phds/run.log"),
    ("delete", None), ("status", None)])
def test_tpu_subcommands(capsys, action, expected):
  cmds, _ = _commands(capsys, ["tpu", action, "--name", "phds", "--zone", "z", "--dry-run"])
  if expected:
    assert cmds[0][-1] == expected
  if action == "delete":
    assert cmds == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "phds", "--quiet", "--zone", "z"]]
  if action == "status":
    assert cmds[0][4] == "describe" and "pgrep -af phds_jax.main" in cmds[1][-1]


def test_slurm_two_node_job(capsys, tmp_path):
  cmds, out = _commands(capsys, ["slurm", "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu",
                                 "--script-dir", str(tmp_path), "--dry-run", "--", *MAIN_ARGS])
  assert cmds == [["sbatch", str(tmp_path / "phds.sbatch")]]
  assert not (tmp_path / "phds.sbatch").exists()  # dry run: printed only
  for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
               "#SBATCH --partition=gpu", "#SBATCH --signal=TERM@120"):
    assert line in out
  srun = next(line for line in out.splitlines() if line.startswith("srun "))
  assert shlex.split(srun)[2:] == ["python", "-m", "phds_jax.main", *MAIN_ARGS, "--config.distributed.enabled=True"]


def test_mistakes_and_help(capsys):
  with pytest.raises(SystemExit):
    launch.main(["tpu", "--name", "x", "--zone", "z", "--accelerator", "v5e-12", "--dry-run", "--", "--config=c"])
  with pytest.raises(SystemExit, match="give the job's arguments after --"):
    launch.main(["slurm", "--nodes", "2", "--dry-run"])
  entry = subprocess.run([sys.executable, "-m", "phds_jax.cli.launch", "--help"], capture_output=True, text=True)
  assert entry.returncode == 0 and "tpu" in entry.stdout and "slurm" in entry.stdout
  capsys.readouterr()
  helps = []
  for cmd in (["tpu"], ["slurm"]):  # the subcommands' help, in this process
    with pytest.raises(SystemExit) as stop:
      launch.main([*cmd, "--help"])
    assert stop.value.code == 0
    helps.append(capsys.readouterr().out)
  for flag in ("--accelerator", "--num-slices", "--spot", "--dry-run", "stop", "delete"):
    assert flag in helps[0]
  for flag in ("--nodes", "--gpus-per-node", "--partition", "--dry-run"):
    assert flag in helps[1]


def test_the_job_config_is_checked_before_anything_runs(capsys, tmp_path):
  tpu = ["tpu", "--name", "x", "--zone", "z", "--accelerator", "v5e-16", "--dry-run", "--"]
  slurm = ["slurm", "--nodes", "2", "--script-dir", str(tmp_path), "--workdir-root", ROOT, "--dry-run", "--"]
  for launcher in (tpu, slurm):
    with pytest.raises(SystemExit) as stop:
      launch.main([*launcher, *MAIN_ARGS, "--config.phds.mask=sofft", "--config.train.steps=-1"])
    out, err = capsys.readouterr()
    assert stop.value.code == 2 and "+ " not in out  # no gcloud / pip / sbatch command, not even printed
    assert "phds.mask='sofft'; choose one of soft, hard" in err and "train.steps=-1 is outside" in err
  with pytest.raises(SystemExit):
    launch.main([*tpu, "--config=configs/nope.py"])
  assert "no such config file" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    launch.main([*slurm, "--config=configs/olmoe.py", "--config.data.train_files=/d/*.jsonl"])
  assert "model_path: required" in capsys.readouterr().err
  # files that are not on this machine are notes: the job looks for them where it runs
  launch.main([*slurm, *MAIN_ARGS])
  out = capsys.readouterr().out
  assert "note: model_path='/models/OLMoE': no such directory" in out
  assert "note: data.train_files: '/data/sft/*.jsonl' matches no file" in out and "+ sbatch" in out
