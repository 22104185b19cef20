"""Roster-of-Experts decoding cost across (members, k): ms/token and memory, as ratios measured in one run.

  python benchmarks/roe_bench.py --out benchmarks/roe_cpu_2core.json --plot benchmarks/roe_decode.png
  python benchmarks/roe_bench.py --small --repeats 2                   # a quick smoke run

Config (OLMoE-shaped, small enough for a 2-core CPU): hidden 256, 4 layers, 8 heads, 64 experts at
k_pre = 8, expert hidden 128, vocab 8192, random weights; batch 4, 64-token prompts, 32 decoded tokens.
For members M in {1, 2, 4, 8} and k in {1, 2, k_pre}, with tau = 0.5 (RoE's tau only changes which experts
are picked, not the cost), it reports:
  - decode ms/token (latency.measure: (time for n tokens - time for 1) / (n - 1), medians, settings timed in
    interleaved rounds so drift in the machine's speed hits every ratio alike), and its ratio to M = 1 at
    k_pre;
  - the cost model's FLOPs per decoded token, M x forward FLOPs at k (phds_jax/plan/cost.py), and its
    ratio to M = 1 at k_pre;
  - the KV cache bytes the decoding program holds (clean cache: one sequence's keys/values, whatever M)
    next to what a cache per member would hold (M times), and the compiled program's temporary bytes
    (XLA memory_analysis: activations of the M x B member rows).
"""

from __future__ import annotations

import argparse
import json
import os
import platform


def _args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="roe_bench.json", help="JSON output path")
  p.add_argument("--plot", default="", help="also draw decode ms/token and FLOPs against M per k (PNG)")
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--small", action="store_true", help="a tiny config for a smoke run")
  return p.parse_args()


ARGS = _args()
from phds_jax import platforms  # noqa: E402

platforms.use_cpu_threads(ARGS.threads)  # before JAX starts; no libtpu probe without an accelerator
import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402

import phds_jax as pj  # noqa: E402
from phds_jax.eval import latency  # noqa: E402
from phds_jax.eval.generate import lower_generate  # noqa: E402
from phds_jax.plan.cost import forward_flops_per_token  # noqa: E402

MEMBERS = (1, 2, 4, 8)
TAU = 0.5


def config():
  if ARGS.small:
    shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                 num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32, vocab_size=512)
    return shape, dict(batch=2, prompt_len=16, decode_tokens=8)
  shape = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
               num_experts=64, num_experts_per_tok=8, moe_intermediate_size=128, vocab_size=8192)
  return shape, dict(batch=4, prompt_len=64, decode_tokens=32)


def cache_bytes(cfg, batch: int, slots: int, itemsize: int) -> int:
  """Keys and values of every layer for `batch` sequences of `slots` positions."""
  return 2 * cfg.num_hidden_layers * batch * slots * cfg.num_key_value_heads * cfg.resolved_head_dim * itemsize


def main():
  shape, run = config()
  cfg = pj.ModelConfig(model_type="olmoe", qk_norm="projection", max_position_embeddings=1024, **shape)
  params = pj.init_params(cfg, jax.random.key(0))
  k_pre, batch, prompt_len, new = cfg.k_pre, run["batch"], run["prompt_len"], run["decode_tokens"]
  ks = sorted({1, 2, k_pre})
  settings = [(m, k) for k in ks for m in MEMBERS]
  prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt_len)).tolist()
  itemsize = np.dtype(jax.tree.leaves(params)[0].dtype).itemsize

  def roe(m):
    return pj.RoE(members=m, tau=TAU, seed=0) if m > 1 else None

  def decode(m, k, n):
    return lambda: pj.generate(cfg, params, prompts, max_new_tokens=n, k=k, stop_tokens=[], bucket=new, roe=roe(m))

  print(f"timing {len(settings)} settings (members x k) in {ARGS.repeats} interleaved rounds ...", flush=True)
  one = latency.interleaved_medians({s: decode(*s, 1) for s in settings}, ARGS.repeats)
  many = latency.interleaved_medians({s: decode(*s, new) for s in settings}, ARGS.repeats)
  rows = []
  for m, k in settings:
    memory = lower_generate(cfg, params, prompts, max_new_tokens=new, k=k, stop_tokens=[], bucket=new,
                            roe=roe(m)).compile().memory_analysis()
    rows.append({"members": m, "k": k, "decode_ms_per_token": 1e3 * max(many[m, k] - one[m, k], 0.0) / (new - 1),
                 "flops_per_token": m * forward_flops_per_token(cfg, k, prompt_len + new / 2),
                 "cache_bytes": cache_bytes(cfg, batch, prompt_len + new, itemsize),
                 "cache_bytes_one_per_member": m * cache_bytes(cfg, batch, prompt_len + new, itemsize),
                 "program_temp_bytes": int(memory.temp_size_in_bytes)})
  ref = next(r for r in rows if r["members"] == 1 and r["k"] == k_pre)
  for r in rows:
    r["time_ratio_vs_m1_kpre"] = r["decode_ms_per_token"] / ref["decode_ms_per_token"]
    r["flop_ratio_vs_m1_kpre"] = r["flops_per_token"] / ref["flops_per_token"]
  result = {"config": {**shape, **run, "tau": TAU}, "threads": ARGS.threads, "machine": platform.platform(),
            "cpu_count": os.cpu_count(), "device": jax.devices()[0].device_kind, "rows": rows}
  with open(ARGS.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"\ndecode with M routing members per sequence (batch {batch}, {prompt_len}-token prompts, "
        f"{new} new tokens; ratios to M=1 at k_pre={k_pre})")
  print(f"{'M':>2} {'k':>2} {'ms/token':>9} {'time x':>7} {'FLOPs x':>8} {'cache MiB':>10} "
        f"{'per-member MiB':>15} {'temp MiB':>9}")
  for r in rows:
    print(f"{r['members']:>2} {r['k']:>2} {r['decode_ms_per_token']:>9.2f} {r['time_ratio_vs_m1_kpre']:>7.2f} "
          f"{r['flop_ratio_vs_m1_kpre']:>8.2f} {r['cache_bytes'] / 2**20:>10.2f} "
          f"{r['cache_bytes_one_per_member'] / 2**20:>15.2f} {r['program_temp_bytes'] / 2**20:>9.2f}")
  print(f"\nwrote {ARGS.out}")
  if ARGS.plot:
    plot(rows, ks, ARGS.plot)
    print(f"wrote {ARGS.plot}")


def plot(rows, ks, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
  for k in ks:
    mine = [r for r in rows if r["k"] == k]
    axes[0].plot([r["members"] for r in mine], [r["time_ratio_vs_m1_kpre"] for r in mine], marker="o", label=f"k={k}")
    axes[1].plot([r["members"] for r in mine], [r["flop_ratio_vs_m1_kpre"] for r in mine], marker="o", label=f"k={k}")
  for ax, title in zip(axes, ("measured decode time", "cost model FLOPs")):
    ax.set_xscale("log", base=2)
    ax.set_xticks(MEMBERS, [str(m) for m in MEMBERS])
    ax.set_xlabel("members M")
    ax.set_ylabel("ratio to M=1 at k_pre")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle("Roster of Experts: decode cost per token (clean cache)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
