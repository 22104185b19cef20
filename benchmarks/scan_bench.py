"""Scanned against unrolled decoder layers: compile time and run time by depth, in one run.

  python benchmarks/scan_bench.py --out benchmarks/scan_cpu_2core.json     # the documented config
  python benchmarks/scan_bench.py --small --depths 2,4                    # a quick smoke run

Config (OLMoE-shaped, mid-size, as benchmarks/moe_bench.py): hidden 512, 8 heads, 64 experts of hidden 256,
k = 8, vocab 8192; batch 2 x 256 tokens. For each depth and both layouts (the same stacked parameters):
  - compile seconds of the training step (forward + backward of the token NLL with the router losses,
    traced k as the trainer runs it) and of generation (prefill + 16 decoded tokens);
  - run time of the training step and of one generation, medians after a warm-up.
The two layouts are compiled and timed alternately, twice each, at each depth (the smaller figure kept), so drift in the machine's speed hits
both sides of a ratio alike. Reported ratios are unrolled / scanned (> 1: scanning is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time


def _args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="scan_bench.json", help="JSON output path")
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--depths", default="2,4,8,16", help="comma-separated layer counts")
  p.add_argument("--small", action="store_true", help="a tiny config for a smoke run")
  return p.parse_args()


ARGS = _args()
from phds_jax import platforms  # noqa: E402

platforms.use_cpu_threads(ARGS.threads)  # before JAX starts; no libtpu probe without an accelerator
import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402

import phds_jax as pj  # noqa: E402
from phds_jax.eval import generate as generate_lib  # noqa: E402
from phds_jax.model import losses  # noqa: E402
from phds_jax.model import transformer  # noqa: E402

transformer.MIN_SCAN_LAYERS = 1  # measure the scan itself at every depth (the default unrolls 1-2 layers)


def _config(depth: int):
  if ARGS.small:
    return pj.preset("tiny-olmoe").replace(num_hidden_layers=depth)
  return pj.preset("olmoe-1b-7b-0125").replace(hidden_size=512, num_attention_heads=8, num_key_value_heads=8,
                                               moe_intermediate_size=256, vocab_size=8192, num_hidden_layers=depth)


def _median_seconds(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _train_step(cfg, scan: bool):
  run = losses.RunSpec(k=(jnp.int32(cfg.k_pre),) * len(cfg.moe_layer_indices), k_max=cfg.k_pre,
                       scan_layers=scan)

  def loss(params, batch):
    terms = losses.nll_and_router_losses(cfg, params, batch, run, lb_coef=0.01, z_coef=0.001)
    return terms.token_loss_sum / terms.weight + terms.extra_loss

  return jax.jit(jax.value_and_grad(loss))


def _measure(cfg, params, batch, prompts, scan: bool) -> dict:
  jax.clear_caches()  # every program compiles afresh (jit's lowering and compilation caches dropped)
  start = time.perf_counter()
  step = _train_step(cfg, scan).lower(params, batch).compile()
  train_compile = time.perf_counter() - start
  args, statics = generate_lib._program_inputs(cfg, params, prompts, max_new_tokens=16, scan_layers=scan)
  start = time.perf_counter()
  gen = generate_lib.generation_program.lower(*args, **statics).compile()
  generate_compile = time.perf_counter() - start
  return {"train_compile_s": train_compile, "generate_compile_s": generate_compile,
          "train_step_s": _median_seconds(lambda: step(params, batch), ARGS.repeats),
          "generate_s": _median_seconds(lambda: gen(*args), ARGS.repeats)}


def main():
  rows = []
  for depth in [int(d) for d in ARGS.depths.split(",")]:
    cfg = _config(depth)
    params = pj.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 256 if not ARGS.small else 32), 0, cfg.vocab_size)
    ones = jnp.ones_like(tokens)
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1), "weights": ones.astype(jnp.float32),
             "positions": jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape), "segment_ids": ones}
    prompts = [list(range(1, 33)), list(range(5, 21))]
    row = {"layers": depth}
    runs = {True: [], False: []}
    for scan in (True, False, True, False):  # alternated twice; each figure is the smaller of its two
      runs[scan].append(_measure(cfg, params, batch, prompts, scan))
    for scan, name in ((True, "scanned"), (False, "unrolled")):
      row[name] = {key: min(r[key] for r in runs[scan]) for key in runs[scan][0]}
    row["unrolled_over_scanned"] = {key: row["unrolled"][key] / row["scanned"][key] for key in row["scanned"]}
    rows.append(row)
    print(json.dumps(row), flush=True)
  out = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "threads": ARGS.threads,
         "jax": jax.__version__, "small": ARGS.small, "rows": rows}
  with open(ARGS.out, "w", encoding="utf-8") as f:
    json.dump(out, f, indent=2)
  print(f"{'layers':>6} {'train compile':>14} {'gen compile':>12} {'train step':>11} {'generate':>9}  (unrolled / scanned)")
  for r in rows:
    q = r["unrolled_over_scanned"]
    print(f"{r['layers']:>6} {q['train_compile_s']:>14.2f} {q['generate_compile_s']:>12.2f} "
          f"{q['train_step_s']:>11.2f} {q['generate_s']:>9.2f}")


if __name__ == "__main__":
  main()
