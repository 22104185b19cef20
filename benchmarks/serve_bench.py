"""Serving benchmark: this server at fixed k, this server with k mixed per request, and `transformers serve`
(with and without --continuous-batching, one process per k as it must), one exported checkpoint, one run.

  python benchmarks/serve_bench.py --out benchmarks/serve_cpu_2core.json --plot benchmarks/serve.png
  python benchmarks/serve_bench.py --quick            # a smoke run: concurrency 1 and 4, few requests

Metrics follow vLLM's `bench serve`: TTFT (request sent -> first streamed token), TPOT = (E2E - TTFT) /
(n - 1) with n the usage's completion tokens, ITL (gaps between streamed chunks), end-to-end latency, at
p50/p99; output tokens/s and requests/s over the measured window. Closed loop: `concurrency` clients each
send their next request when the last one ends; the first `concurrency` requests of a level are a warm-up
and are not measured. Prompts are random words of the benchmark's tokenizer (seeded), 32 tokens each,
max_tokens 32, greedy.

The model is OLMoE-shaped with random weights (hidden 256, 4 layers, 32 experts at k_pre = 8, expert hidden
128, vocabulary ~2k words): big enough that the experts' work shows in TPOT on a CPU.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np


def _args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="serve_bench.json")
  p.add_argument("--plot", default="")
  p.add_argument("--concurrency", default="1,8,32")
  p.add_argument("--ks", default="1,2,4,8", help="fixed k levels (this server), mixed uniformly for the mixed run")
  p.add_argument("--hf-ks", default="2,8", help="k levels served by transformers serve (one process each)")
  p.add_argument("--requests", type=int, default=2, help="measured requests per client at each concurrency")
  p.add_argument("--quick", action="store_true")
  return p.parse_args(argv)


WORDS = [f"w{i}" for i in range(2000)]
PROMPT_TOKENS, MAX_TOKENS = 32, 32


def build_model(directory: str, k: int = 8) -> None:
  """The benchmark checkpoint (random OLMoE-shaped weights, a word-level tokenizer) at top-k = `k`."""
  import torch
  import transformers
  from tokenizers import Tokenizer, models, pre_tokenizers
  vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", "<unk>"] + WORDS)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                              eos_token="<eos>", unk_token="<unk>")
  config = transformers.OlmoeConfig(vocab_size=len(vocab), hidden_size=256, intermediate_size=128, num_hidden_layers=4,
                                    num_attention_heads=8, num_key_value_heads=8, num_experts=32, num_experts_per_tok=k,
                                    max_position_embeddings=128, eos_token_id=2, pad_token_id=0, bos_token_id=1)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config)
  model.save_pretrained(directory)
  fast.save_pretrained(directory)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_ready(url: str, proc, seconds: float = 600) -> None:
  import httpx
  end = time.monotonic() + seconds
  while time.monotonic() < end:
    if proc.poll() is not None:
      raise RuntimeError(f"server exited: {proc.stdout.read()[-3000:]}")
    try:
      if httpx.get(url + "/health", timeout=2).status_code == 200 and httpx.get(url + "/v1/models").status_code == 200:
        return
    except Exception:  # pylint: disable=broad-except
      pass
    time.sleep(0.5)
  raise TimeoutError(url)


def one_request(url: str, model: str, prompt: str, extra: dict) -> dict:
  """Streams one completion -> {ttft, e2e, itl: [...], tokens}."""
  import httpx
  body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
          "stream_options": {"include_usage": True}, **extra}
  start = time.perf_counter()
  first, last, gaps, tokens = None, None, [], 0
  with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
    r.raise_for_status()
    for line in r.iter_lines():
      if not line.startswith("data: {"):
        continue
      chunk = json.loads(line[6:])
      if chunk.get("usage"):
        tokens = chunk["usage"]["completion_tokens"]
      if any(c.get("text") for c in chunk.get("choices", [])):
        now = time.perf_counter()
        if first is None:
          first = now
        else:
          gaps.append(now - last)
        last = now
  end = time.perf_counter()
  first = first or end
  return {"ttft": first - start, "e2e": end - start, "itl": gaps, "tokens": tokens,
          "tpot": (end - first) / (tokens - 1) if tokens > 1 else None}


def closed_loop(url: str, model: str, concurrency: int, per_client: int, extra_of, seed: int = 0) -> dict:
  """`concurrency` clients, each: one warm-up request, then `per_client` measured ones."""
  rng = random.Random(seed)
  prompts = [" ".join(rng.choice(WORDS) for _ in range(PROMPT_TOKENS)) for _ in range(concurrency * (per_client + 1))]
  results, window = [], {}

  def client(c):
    one_request(url, model, prompts[c], extra_of(c))  # warm-up
    window.setdefault("start", time.perf_counter())
    out = []
    for i in range(per_client):
      j = concurrency + c * per_client + i
      out.append(one_request(url, model, prompts[j], extra_of(j)))
    return out

  with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
    for out in pool.map(client, range(concurrency)):
      results += out
  elapsed = time.perf_counter() - window["start"]
  pct = lambda values, q: float(np.percentile(values, q) * 1000) if values else None
  ttft = [r["ttft"] for r in results]
  tpot = [r["tpot"] for r in results if r["tpot"] is not None]
  itl = [g for r in results for g in r["itl"]]
  e2e = [r["e2e"] for r in results]
  out_tokens = sum(r["tokens"] for r in results)
  return {"concurrency": concurrency, "requests": len(results), "output_tokens": out_tokens,
          "output_tokens_per_s": out_tokens / elapsed, "requests_per_s": len(results) / elapsed,
          **{f"{name}_ms_p{q}": pct(values, q) for name, values in
             (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2e", e2e)) for q in (50, 99)}}


def start_ours(directory: str, slots: int, ks) -> tuple:
  port = _free_port()
  cmd = [sys.executable, "-m", "phds_jax.cli.serve", directory, f"--port={port}", f"--slots={slots}",
         "--roe-members=0", "--max-len=128", "--buckets=32", f"--widths={','.join(map(str, sorted(ks)))}",
         f"--k-max={max(ks)}",
         "--max-waiting=256"]
  return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), f"http://127.0.0.1:{port}"


def start_transformers(directory: str, batching: bool) -> tuple:
  port = _free_port()
  cmd = ["transformers", "serve", directory, "--device", "cpu", "--dtype", "float32", "--host", "127.0.0.1",
         "--port", str(port), "--continuous-batching" if batching else "--no-continuous-batching"]
  return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), f"http://127.0.0.1:{port}"


def stop(proc) -> None:
  proc.send_signal(signal.SIGTERM)
  try:
    proc.wait(timeout=60)
  except subprocess.TimeoutExpired:
    proc.kill()


def main():
  args = _args()
  levels = [1, 4] if args.quick else [int(c) for c in args.concurrency.split(",")]
  per_client = 1 if args.quick else args.requests
  ks = [int(k) for k in args.ks.split(",")]
  hf_ks = [int(k) for k in args.hf_ks.split(",")]
  work = tempfile.mkdtemp(prefix="phds_serve_bench_")
  base = os.path.join(work, "k8")
  build_model(base)
  runs = []

  def record(server, k, rows):
    for row in rows:
      runs.append({"server": server, "k": k, **row})
      print(f"{server:>28} k={str(k):>5} c={row['concurrency']:>3}: {row['output_tokens_per_s']:7.1f} tok/s  "
            f"TTFT p50 {row['ttft_ms_p50']:7.1f} ms  TPOT p50 {row['tpot_ms_p50'] or float('nan'):6.1f} ms", flush=True)

  proc, url = start_ours(base, max(levels), ks)
  try:
    _wait_ready(url, proc)
    for k in ks:
      record("phds_jax", k, [closed_loop(url, "k8", c, per_client, lambda _, k=k: {"k": k}) for c in levels])
    mixed = lambda j: {"k": ks[j % len(ks)]}
    record("phds_jax mixed", "mixed", [closed_loop(url, "k8", c, per_client, mixed) for c in levels])
  finally:
    stop(proc)
  for k in hf_ks:
    directory = os.path.join(work, f"k{k}")
    if not os.path.isdir(directory):
      build_model(directory, k)
    for batching in (False, True):
      name = "transformers serve" + (" --cb" if batching else "")
      proc, url = start_transformers(directory, batching)
      try:
        _wait_ready(url, proc)
        record(name, k, [closed_loop(url, directory, c, per_client, lambda _: {}) for c in levels])
      finally:
        stop(proc)
  cpu = platform.processor() or platform.machine()
  try:
    cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  out = {"cpu": cpu, "cores": os.cpu_count(), "prompt_tokens": PROMPT_TOKENS, "max_tokens": MAX_TOKENS,
         "mixed_ks": ks, "mixed_mean_k": float(np.mean(ks)), "runs": runs}
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)
  print(f"wrote {args.out}")
  if args.plot:
    plot(out, args.plot)


def plot(out: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  series = {}
  for run in out["runs"]:
    series.setdefault((run["server"], run["k"]), []).append(run)
  for (server, k), rows in series.items():
    left.plot([r["concurrency"] for r in rows], [r["output_tokens_per_s"] for r in rows], marker="o",
              linestyle="-" if server.startswith("phds") else "--", label=f"{server} k={k}")
  left.set(xscale="log", xlabel="concurrency (closed loop)", ylabel="output tokens/s", title="throughput")
  left.legend(fontsize=7)
  for server in ("phds_jax", "transformers serve --cb"):
    for concurrency in sorted({r["concurrency"] for r in out["runs"]}):
      rows = [r for r in out["runs"] if r["server"] == server and r["concurrency"] == concurrency and r["k"] != "mixed"]
      if rows:
        right.plot([r["k"] for r in rows], [r["tpot_ms_p50"] for r in rows], marker="o",
                   label=f"{server} c={concurrency}")
  right.set(xlabel="k", ylabel="TPOT p50 (ms)", title="time per output token vs k")
  right.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
