"""`phds-launch`: run `python -m phds_jax.main` on a Cloud TPU slice (gcloud) or a SLURM GPU cluster.

  phds-launch tpu --name phds --zone us-west4-a --accelerator v5e-16 [--spot] [--num-slices 2] \\
      -- --config=configs/olmoe.py --config.model_path=/models/OLMoE-1B-7B-0125 ...
  phds-launch tpu status|logs|stop|delete --name phds --zone us-west4-a [--num-slices 2]
  phds-launch slurm --nodes 2 --gpus-per-node 8 [--partition P] -- --config=configs/qwen_moe.py ...

`tpu` creates the TPU VM (a queued resource for several slices, or with --queued) unless it exists,
builds this project's wheel, copies it and `configs/` to every worker, installs it with the `[tpu]`
extra, starts the job on all workers with `--config.distributed.enabled=True` (JAX finds the
coordinator and process ids from the TPU VM metadata) and streams worker 0's log. `stop` sends SIGTERM:
the trainer finishes its step, checkpoints and exits; running the same command again resumes.
`slurm` writes an sbatch script (one task per node, `srun`; SLURM's environment gives JAX the process
layout) and submits it. `--dry-run` prints every command (and the script) and runs nothing.
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import os
import shlex
import subprocess
import sys
import time
from typing import Optional, Sequence

from phds_jax.plan import topology

REMOTE_DIR = "phds"  # in each worker's home directory: the wheel, configs/ and run.log
LOG = f"~/{REMOTE_DIR}/run.log"
# Cloud TPU's accelerator type and runtime image per generation (override with --runtime-version)
ACCELERATOR_PREFIX = {"v4": "v4", "v5e": "v5litepod", "v5p": "v5p", "v6e": "v6e"}
RUNTIME = {"v4": "tpu-ubuntu2204-base", "v5e": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5",
           "v6e": "v2-alpha-tpuv6e"}
TPU_ACTIONS = ("run", "status", "logs", "stop", "delete")


class Shell:
  """Runs commands, or only prints them (dry run). Every command is printed as it would be typed."""

  def __init__(self, dry_run: bool):
    self.dry_run = dry_run

  def run(self, argv: Sequence[str], check: bool = True) -> int:
    print("+ " + shlex.join(argv), flush=True)
    if self.dry_run:
      return 0
    status = subprocess.call(list(argv))
    if check and status != 0:
      raise SystemExit(f"phds-launch: command failed with exit status {status}: {shlex.join(argv)}")
    return status

  def succeeds(self, argv: Sequence[str]) -> bool:
    """Whether `argv` exits 0 (a query, e.g. does the TPU exist); a dry run assumes it does not."""
    print("+ " + shlex.join(argv) + "  # query", flush=True)
    if self.dry_run:
      return False
    return subprocess.call(list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) == 0

  def output(self, argv: Sequence[str]) -> str:
    if self.dry_run:
      return ""
    return subprocess.run(list(argv), capture_output=True, text=True, check=False).stdout.strip()


# ---- TPU ---------------------------------------------------------------------------------------------------


class Tpu:
  """gcloud commands for one TPU VM (`--num-slices 1`) or a multi-slice queued resource."""

  def __init__(self, args: argparse.Namespace):
    self.args = args
    self.spec = topology.parse_slice(args.accelerator, args.num_slices) if args.accelerator else None
    self.queued = args.queued or args.num_slices > 1

  def _where(self) -> list[str]:
    out = ["--zone", self.args.zone]
    return out + (["--project", self.args.project] if self.args.project else [])

  @property
  def nodes(self) -> list[str]:
    """The TPU VMs: the name itself, or name-0, name-1, ... for the slices of a queued resource."""
    if self.args.num_slices > 1:
      return [f"{self.args.name}-{i}" for i in range(self.args.num_slices)]
    return [self.args.name]

  def accelerator_type(self) -> str:
    count = self.args.accelerator.rsplit("-", 1)[1]
    return f"{ACCELERATOR_PREFIX[self.spec.generation]}-{count}"

  def describe(self) -> list[str]:
    if self.queued:
      return ["gcloud", "compute", "tpus", "queued-resources", "describe", self.args.name, *self._where()]
    return ["gcloud", "compute", "tpus", "tpu-vm", "describe", self.args.name, *self._where()]

  def create(self) -> list[str]:
    version = self.args.runtime_version or RUNTIME[self.spec.generation]
    spot = ["--spot"] if self.args.spot else []
    if self.queued:
      nodes = (["--node-count", str(self.args.num_slices), "--node-prefix", self.args.name]
               if self.args.num_slices > 1 else ["--node-id", self.args.name])
      return ["gcloud", "compute", "tpus", "queued-resources", "create", self.args.name, *nodes,
              "--accelerator-type", self.accelerator_type(), "--runtime-version", version, *spot, *self._where()]
    return ["gcloud", "compute", "tpus", "tpu-vm", "create", self.args.name, "--accelerator-type",
            self.accelerator_type(), "--version", version, *spot, *self._where()]

  def state(self) -> list[str]:
    return [*self.describe(), "--format=value(state.state)"]

  def delete(self) -> list[str]:
    if self.queued:
      return ["gcloud", "compute", "tpus", "queued-resources", "delete", self.args.name, "--force", "--quiet",
              *self._where()]
    return ["gcloud", "compute", "tpus", "tpu-vm", "delete", self.args.name, "--quiet", *self._where()]

  def ssh(self, node: str, command: str, worker: str = "all") -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, f"--worker={worker}", *self._where(),
            "--command", command]

  def scp(self, node: str, paths: list[str]) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", *paths, f"{node}:~/{REMOTE_DIR}/",
            "--worker=all", *self._where()]


def _wheel(shell: Shell, root: str, out_dir: str) -> str:
  """Builds this project's wheel (no dependencies) into out_dir; its path."""
  shell.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", out_dir, root])
  built = sorted(glob.glob(os.path.join(out_dir, "phds_jax-*.whl")), key=os.path.getmtime)
  return built[-1] if built and not shell.dry_run else os.path.join(
      out_dir, f"phds_jax-{importlib.metadata.version('phds_jax')}-py3-none-any.whl")


def _main_command(main_args: Sequence[str]) -> str:
  """The job every worker starts, in the background with its output in run.log (SIGTERM checkpoints)."""
  job = shlex.join(["python3", "-m", "phds_jax.main", *main_args, "--config.distributed.enabled=True"])
  return f"cd ~/{REMOTE_DIR} && nohup {job} > {LOG} 2>&1 < /dev/null &"


def tpu(args: argparse.Namespace, shell: Shell) -> int:
  t = Tpu(args)
  if args.action == "status":
    shell.run(t.describe())
    for node in t.nodes:
      shell.run(t.ssh(node, f"pgrep -af phds_jax.main || echo 'no job running'; tail -n 3 {LOG}", "all"),
                check=False)
    return 0
  if args.action == "logs":
    follow = "-f " if args.follow else ""
    return shell.run(t.ssh(t.nodes[0], f"tail -n {args.lines} {follow}{LOG}", "0"), check=False)
  if args.action == "stop":
    for node in t.nodes:
      shell.run(t.ssh(node, "pkill -TERM -f phds_jax.main || true"))
    return 0
  if args.action == "delete":
    return shell.run(t.delete())
  if not args.main_args:
    raise SystemExit("phds-launch tpu: give the job's arguments after --, e.g. -- --config=configs/olmoe.py")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if not os.path.isfile(os.path.join(root, "pyproject.toml")):
    raise SystemExit(f"phds-launch tpu builds the wheel it installs from a source checkout; {root} is not one "
                     "(clone the repository and pip install -e it)")
  _check_job(args, root)
  if shell.succeeds(t.describe()):
    print(f"reusing {args.name}", flush=True)
  else:
    shell.run(t.create())
    if t.queued:
      _wait_active(t, shell)
  wheel = _wheel(shell, root, os.path.join(root, "dist"))
  for node in t.nodes:
    shell.run(t.ssh(node, f"mkdir -p ~/{REMOTE_DIR}"))
    shell.run(t.scp(node, [wheel, os.path.join(root, "configs")]))
    shell.run(t.ssh(node, f"python3 -m pip install --quiet --upgrade ~/{REMOTE_DIR}/{os.path.basename(wheel)}'[tpu]'"))
  for node in t.nodes:
    shell.run(t.ssh(node, _main_command(args.main_args)))
  print(f"started on {len(t.nodes)} slice(s); worker 0's log follows (Ctrl-C leaves the job running; "
        f"`phds-launch tpu stop --name {args.name} --zone {args.zone}` checkpoints and stops it)", flush=True)
  return shell.run(t.ssh(t.nodes[0], f"tail -n +1 -f {LOG}", "0"), check=False)


def _wait_active(t: Tpu, shell: Shell, poll_s: float = 30.0):
  """Waits until the queued resource is ACTIVE (slices provisioned), printing its state changes."""
  if shell.dry_run:
    print("+ (wait until " + shlex.join(t.state()) + " prints ACTIVE)", flush=True)
    return
  last = None
  while True:
    state = shell.output(t.state())
    if state != last:
      print(f"{t.args.name}: {state or 'unknown'}", flush=True)
      last = state
    if state == "ACTIVE":
      return
    if state in ("FAILED", "SUSPENDED"):
      raise SystemExit(f"phds-launch: queued resource {t.args.name} is {state}")
    time.sleep(poll_s)


# ---- SLURM ---------------------------------------------------------------------------------------------------


def sbatch_script(args: argparse.Namespace) -> str:
  """One task per node holding all its GPUs; SIGTERM 120 s before the time limit lets the trainer
  checkpoint; the job resubmitted with the same workdir resumes."""
  lines = ["#!/bin/bash", f"#SBATCH --job-name={args.job_name}", f"#SBATCH --nodes={args.nodes}",
           "#SBATCH --ntasks-per-node=1", f"#SBATCH --gpus-per-node={args.gpus_per_node}",
           f"#SBATCH --cpus-per-task={args.cpus_per_task}", f"#SBATCH --time={args.time}",
           f"#SBATCH --output={args.job_name}-%j.out", "#SBATCH --signal=TERM@120"]
  if args.partition:
    lines.append(f"#SBATCH --partition={args.partition}")
  if args.account:
    lines.append(f"#SBATCH --account={args.account}")
  job = shlex.join(["python", "-m", "phds_jax.main", *args.main_args, "--config.distributed.enabled=True"])
  lines += ["", "set -euo pipefail", f"cd {shlex.quote(os.path.abspath(args.workdir_root))}",
            f"srun --kill-on-bad-exit=1 {job}", ""]
  return "\n".join(lines)


def slurm(args: argparse.Namespace, shell: Shell) -> int:
  if not args.main_args:
    raise SystemExit("phds-launch slurm: give the job's arguments after --, e.g. -- --config=configs/olmoe.py")
  _check_job(args, os.path.abspath(args.workdir_root))
  script = sbatch_script(args)
  path = os.path.join(args.script_dir, f"{args.job_name}.sbatch")
  print(f"# {path}\n{script}", flush=True)
  if not shell.dry_run:
    os.makedirs(args.script_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
      f.write(script)
  return shell.run(["sbatch", path])


# ---- the job's config, checked here first ---------------------------------------------------------------------


def job_problems(main_args: Sequence[str], root: str) -> tuple[list[str], list[str]]:
  """(mistakes, notes) in the config `main_args` give `python -m phds_jax.main`, found on this machine before
  anything is created or submitted: the checks the job itself runs first (phds_jax/cli/config_check.py).
  A file the job reads that is not here (a path on the workers, or a bucket this machine cannot read) is a
  note, not a mistake. `root`: the directory the job runs in (relative config paths start there)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  from phds_jax.cli import config_check  # pylint: disable=g-import-not-at-top
  from phds_jax.cli import distributed  # pylint: disable=g-import-not-at-top
  from phds_jax.cli import modes  # pylint: disable=g-import-not-at-top
  from phds_jax.io import files  # pylint: disable=g-import-not-at-top

  argv = [a if not a.startswith("--config=") else "--config=" + os.path.join(root, a.split("=", 1)[1])
          for a in main_args]
  config_files = [a.split("=", 1)[1].split(":", 1)[0] for a in argv if a.startswith("--config=")]
  if not config_files:
    return ["give the job's config: -- --config=configs/<name>.py ..."], []
  if not os.path.isfile(config_files[-1]):
    return [f"--config: no such config file {config_files[-1]} (the job runs in {root})"], []
  job_argv = ["phds_jax.main", *[a for a in argv if a.startswith("--config")], "--config.distributed.enabled=True"]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True, sys_argv=job_argv)
  try:
    flag_values(job_argv)
  except Exception as e:  # pylint: disable=broad-except  (config_flags raises many kinds)
    return [str(e).strip()], []
  config = flag_values.config
  with files.buckets_elsewhere():
    if config.compile_topology:
      found = config_check.plan_problems(config)
    else:
      found = distributed.problems(config.distributed) + modes.problems(config)
  notes = [p for p in found if isinstance(p, config_check.FileProblem)]
  return [p for p in found if p not in notes], notes


def _check_job(args: argparse.Namespace, root: str):
  """Refuses a job whose config has a mistake (exit 2) before any gcloud or sbatch command runs."""
  mistakes, notes = job_problems(args.main_args, root)
  for note in notes:
    print(f"note: {note} (the job looks again where it runs)", flush=True)
  if mistakes:
    print("phds-launch: the job's config has mistakes; nothing was created or submitted:", file=sys.stderr)
    for line in mistakes:
      print(f"  {line}", file=sys.stderr)
    raise SystemExit(2)


# ---- command line ------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="phds-launch", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="Arguments after -- go to python -m phds_jax.main unchanged.")
  sub = p.add_subparsers(dest="target", required=True)
  t = sub.add_parser("tpu", help="a Cloud TPU slice (or several, over DCN) through gcloud")
  t.add_argument("action", nargs="?", default="run", choices=TPU_ACTIONS,
                 help="run (default): create or reuse the TPU, install, start the job, stream worker 0's log; "
                      "status: the TPU's state and the job on each worker; logs: worker 0's log; stop: SIGTERM "
                      "the job (it checkpoints and exits); delete: delete the TPU")
  t.add_argument("--name", required=True, help="TPU VM (or queued resource) name")
  t.add_argument("--zone", required=True, help="Cloud zone, e.g. us-west4-a")
  t.add_argument("--project", default="", help="Cloud project (default: gcloud's configured one)")
  t.add_argument("--accelerator", default="", help="slice, as Cloud TPU names it: v5e-16, v4-32, v5p-32, v6e-8 "
                                                   "(required to create one)")
  t.add_argument("--num-slices", type=int, default=1, help="slices joined over DCN (a queued resource)")
  t.add_argument("--spot", action="store_true", help="spot capacity (preemptible; SIGTERM checkpoints)")
  t.add_argument("--queued", action="store_true", help="create one slice as a queued resource as well")
  t.add_argument("--runtime-version", default="", help="TPU software image (default: per generation, "
                                                        + ", ".join(f"{k} {v}" for k, v in RUNTIME.items()) + ")")
  t.add_argument("--lines", type=int, default=100, help="logs: lines of worker 0's log to show")
  t.add_argument("--follow", action="store_true", help="logs: keep streaming")
  t.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  s = sub.add_parser("slurm", help="a SLURM GPU cluster: one process per node through srun")
  s.add_argument("--nodes", type=int, required=True, help="nodes (one JAX process each)")
  s.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node")
  s.add_argument("--cpus-per-task", type=int, default=16, help="CPU cores per node's task (data loading)")
  s.add_argument("--partition", default="", help="SLURM partition")
  s.add_argument("--account", default="", help="SLURM account")
  s.add_argument("--time", default="24:00:00", help="time limit (SIGTERM 120 s before it checkpoints)")
  s.add_argument("--job-name", default="phds", help="job name; also the script's and the log's name")
  s.add_argument("--script-dir", default="slurm", help="where the sbatch script is written")
  s.add_argument("--workdir-root", default=".", help="directory the job runs in (holds configs/)")
  s.add_argument("--dry-run", action="store_true", help="print the script and the sbatch command, run nothing")
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  main_args = argv[argv.index("--") + 1:] if "--" in argv else []
  args = parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
  args.main_args = main_args
  shell = Shell(args.dry_run)
  if args.target == "tpu":
    if args.action == "run" and not args.accelerator:
      parser().error("tpu: --accelerator is required to create or reuse a slice (e.g. v5e-16)")
    try:
      return tpu(args, shell)
    except ValueError as e:  # a slice name the plan module does not know
      parser().error(str(e))
  return slurm(args, shell)


if __name__ == "__main__":
  sys.exit(main())
