"""MoE speed across k: phds_jax against transformers' PyTorch OlmoeForCausalLM, in one run.

  python benchmarks/moe_bench.py --out /tmp/moe_bench.json            # the documented mid-size config
  python benchmarks/moe_bench.py --small --repeats 2                   # a quick smoke run

Config (OLMoE-shaped, mid-size): hidden 512, 8 layers, 8 heads, 64 experts, expert hidden 256,
vocab 8192; batch 2 x 512 tokens; k in {1, 2, 4, 8}. Reports, per k:
  - full-model forward tokens/s for phds_jax and PyTorch (same weights, routers set to k) and the ratio;
  - the MoE layer alone: useful GFLOP/s (2 * tokens * k * 3 * hidden * expert_hidden / time) for each expert
    backend, against a plain x @ W matmul of the same useful FLOPs (the practical limit), measured here;
    the ratios are for the platform's default backend (`experts.default_backend`, what "auto" runs);
  - time(k) / time(k=8) for the MoE layer and the full model, next to the FLOP ratio (for the full model the
    ratio of all useful forward FLOPs: attention, router and head included, see model_flops_per_token);
  - a training step (forward + backward + AdamW) tokens/s at k_train in {1, 8};
  - decode ms/token at batch 1 and 8.
Both frameworks get the same number of threads (--threads, default 2). Times are medians after warm-up;
the two frameworks' forwards are timed alternately, and each backend's MoE layer at every k in shared
rounds, so drift in the machine's speed hits the ratios' two sides alike.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import tempfile


def _args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="moe_bench.json", help="JSON output path")
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--small", action="store_true", help="a tiny config for a smoke run")
  p.add_argument("--backends", default="chunked,sorted,ragged,reference", help="expert backends for the layer table")
  return p.parse_args()


ARGS = _args()
from phds_jax import platforms  # noqa: E402

platforms.use_cpu_threads(ARGS.threads)  # before JAX starts; no libtpu probe without an accelerator
import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import phds_jax as pj  # noqa: E402
from phds_jax.eval import latency  # noqa: E402
from phds_jax.model import experts as experts_lib  # noqa: E402
from phds_jax.model import routing  # noqa: E402

KS = (1, 2, 4, 8)
DEFAULT = experts_lib.default_backend(jax.default_backend())
if DEFAULT not in ARGS.backends.split(","):
  raise SystemExit(f"--backends must include the platform default {DEFAULT!r}")


def config():
  if ARGS.small:
    return dict(hidden=64, layers=2, heads=4, experts=16, expert_hidden=32, vocab=512, batch=2, seq=64)
  return dict(hidden=512, layers=8, heads=8, experts=64, expert_hidden=256, vocab=8192, batch=2, seq=512)


def model_flops_per_token(c, k):
  """Useful forward FLOPs per token: projections, causal attention (mean (L+1)/2 keys), router, k experts, head."""
  h, layers, seq = c["hidden"], c["layers"], c["seq"]
  attention = 2 * 4 * h * h + 2 * 2 * h * (seq + 1) / 2  # q, k, v, o projections; scores and values
  moe = 2 * h * c["experts"] + k * 3 * 2 * h * c["expert_hidden"]
  return layers * (attention + moe) + 2 * h * c["vocab"]


def build_models(c):
  import torch
  import transformers

  torch.set_num_threads(ARGS.threads)
  hf_cfg = transformers.OlmoeConfig(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["expert_hidden"],
                                    num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                                    num_experts=c["experts"], num_experts_per_tok=8, max_position_embeddings=2048)
  torch.manual_seed(0)
  model = transformers.OlmoeForCausalLM(hf_cfg).eval()
  with tempfile.TemporaryDirectory() as d:
    model.save_pretrained(d)
    cfg, params = pj.hf.load_pretrained(d)
  return model, cfg, params


def forward_times(model, cfg, params, tokens, k):
  """(phds_jax, torch) median forward seconds at top-k, the two timed alternately after a warm-up."""
  import torch

  for m in model.modules():
    if hasattr(m, "top_k") and hasattr(m, "norm_topk_prob"):
      m.top_k = k
  ids = torch.tensor(np.array(tokens))
  with torch.inference_mode():
    t = latency.interleaved_medians({"phds": lambda: pj.forward(cfg, params, tokens, k=k), "torch": lambda: model(ids)},
                            ARGS.repeats)
  return t["phds"], t["torch"]


def layer_rows(c):
  """MoE layer alone per backend and k, and the plain-matmul limit of the same useful FLOPs."""
  tokens = c["batch"] * c["seq"]
  h, i, e = c["hidden"], c["expert_hidden"], c["experts"]
  keys = jax.random.split(jax.random.key(0), 5)
  w = experts_lib.ExpertWeights(gate=jax.random.normal(keys[0], (e, h, i)) * 0.02,
                                up=jax.random.normal(keys[1], (e, h, i)) * 0.02,
                                down=jax.random.normal(keys[2], (e, i, h)) * 0.02)
  x = jax.random.normal(keys[3], (tokens, h))
  probs = routing.router_probs(jax.random.normal(keys[4], (tokens, e)))
  fns, flops = {}, {}
  for k in KS:
    r = routing.route(probs, k=k, width=k, norm_topk_prob=False)
    flops[k] = 2 * tokens * k * 3 * h * i
    # the practical limit: three plain matmuls with the same useful FLOPs ([T*k, H] x [H, I] etc.)
    xa = jax.random.normal(keys[0], (tokens * k, h))
    wa, wc, wb = (jax.random.normal(keys[j], shape) for j, shape in ((1, (h, i)), (2, (h, i)), (3, (i, h))))
    plain = jax.jit(lambda xa, wa, wc, wb: ((xa @ wa) * (xa @ wc)) @ wb)  # distinct weights: no CSE
    fns[k, "plain"] = functools.partial(plain, xa, wa, wc, wb)
    for backend in ARGS.backends.split(","):
      fns[k, backend] = functools.partial(jax.jit(experts_lib.BACKENDS[backend]), x, r.experts, r.weights, w)
  # each backend (and the plain limit) timed over all k in shared rounds: drift hits t(k)/t(8) alike, while
  # the slow reference/ragged calls never run between two chunked calls (they change its timings)
  t = {}
  for name in ["plain"] + ARGS.backends.split(","):
    t.update(latency.interleaved_medians({key: fn for key, fn in fns.items() if key[1] == name}, ARGS.repeats))
  rows = []
  for k in KS:
    row = {"k": k, "useful_gflop": flops[k] / 1e9, "plain_matmul_gflops": flops[k] / t[k, "plain"] / 1e9}
    for backend in ARGS.backends.split(","):
      row[f"{backend}_ms"] = 1e3 * t[k, backend]
      row[f"{backend}_gflops"] = flops[k] / t[k, backend] / 1e9
      print(f"MoE layer k={k} {backend}: {1e3 * t[k, backend]:.1f} ms, {row[f'{backend}_gflops']:.1f} GFLOP/s "
            f"(plain matmul {row['plain_matmul_gflops']:.1f})", flush=True)
    rows.append(row)
  return rows


def train_rows(cfg, params, tokens):
  from phds_jax.cli.configs import base_config
  from phds_jax.model import sharding
  from phds_jax.train import loop as train

  out = []
  for k in (1, 8):
    c = base_config()
    c.train.compute_dtype = "float32"
    c.phds.k_values = "1,8"
    c.phds.k_mode = "static"
    c.phds.mask = "hard"
    mesh = sharding.make_mesh({"data": -1})
    trainer = train.Trainer(cfg, c, mesh, 100)
    state = trainer.init_state(params, train.trainable_paths(cfg, params, "all"), seed=0)
    b, l = tokens.shape
    batch = trainer.global_batch({"inputs": np.asarray(tokens), "targets": np.asarray(tokens),
                                  "weights": np.ones((b, l), np.float32), "segment_ids": np.ones((b, l), np.int32),
                                  "positions": np.tile(np.arange(l, dtype=np.int32), (b, 1))})
    holder = {"state": state}

    def step():
      holder["state"], metrics = trainer.train_step(holder["state"], batch, k)
      return metrics

    out.append({"k_train": k, "tokens_per_s": tokens.size / latency.median_seconds(step, ARGS.repeats)})
    print(f"train step k_train={k}: {out[-1]['tokens_per_s']:,.0f} tok/s", flush=True)
  return out


def main():
  c = config()
  print(f"config {c}, threads {ARGS.threads}, device {jax.devices()[0].device_kind}", flush=True)
  model, cfg, params = build_models(c)
  tokens = jax.random.randint(jax.random.key(1), (c["batch"], c["seq"]), 0, c["vocab"], jnp.int32)
  full = []
  for k in KS:
    ours, theirs = forward_times(model, cfg, params, tokens, k)
    full.append({"k": k, "phds_tokens_per_s": tokens.size / ours, "torch_tokens_per_s": tokens.size / theirs,
                 "speedup_vs_torch": theirs / ours, "phds_ms": 1e3 * ours, "torch_ms": 1e3 * theirs})
    print(f"forward k={k}: phds {tokens.size / ours:,.0f} tok/s, torch {tokens.size / theirs:,.0f} tok/s", flush=True)
  base = {r["k"]: r for r in full}[8]
  for r in full:
    r["time_ratio_vs_k8"] = r["phds_ms"] / base["phds_ms"]
    r["flop_ratio_vs_k8"] = model_flops_per_token(c, r["k"]) / model_flops_per_token(c, 8)
  layer = layer_rows(c)
  base_layer = {r["k"]: r for r in layer}[8]
  for r in layer:
    r["flop_ratio_vs_k8"] = r["k"] / 8
    r["default_backend"] = DEFAULT
    r["default_time_ratio_vs_k8"] = r[f"{DEFAULT}_ms"] / base_layer[f"{DEFAULT}_ms"]
    r["default_fraction_of_plain"] = r[f"{DEFAULT}_gflops"] / r["plain_matmul_gflops"]
  decode = []
  for batch in (1, 8):
    for k in KS:
      m = latency.measure(cfg, params, k, batch_size=batch, prompt_len=32, decode_tokens=64, repeats=ARGS.repeats)
      decode.append({"batch": batch, "k": k, "decode_ms_per_token": m["decode_ms_per_token"]})
      print(f"decode batch {batch} k={k}: {m['decode_ms_per_token']:.2f} ms/token", flush=True)
  train_stats = train_rows(cfg, params, tokens)
  result = {"config": c, "threads": ARGS.threads, "machine": platform.platform(), "cpu_count": os.cpu_count(),
            "device": jax.devices()[0].device_kind, "forward": full, "moe_layer": layer, "decode": decode,
            "train_step": train_stats}
  with open(ARGS.out, "w") as f:
    json.dump(result, f, indent=2)
  print("\nfull model forward")
  print(f"{'k':>3} {'phds tok/s':>11} {'torch tok/s':>12} {'ratio':>6} {'t(k)/t(8)':>10} {'flops k/8':>10}")
  for r in full:
    print(f"{r['k']:>3} {r['phds_tokens_per_s']:>11,.0f} {r['torch_tokens_per_s']:>12,.0f} "
          f"{r['speedup_vs_torch']:>6.2f} {r['time_ratio_vs_k8']:>10.3f} {r['flop_ratio_vs_k8']:>10.3f}")
  print("\nMoE layer alone (useful GFLOP/s)")
  names = ARGS.backends.split(",")
  print(f"{'k':>3} {'plain matmul':>12} " + " ".join(f"{n:>10}" for n in names)
        + f" {DEFAULT + '/plain':>13} {'t(k)/t(8)':>10}")
  for r in layer:
    print(f"{r['k']:>3} {r['plain_matmul_gflops']:>12.1f} " + " ".join(f"{r[n + '_gflops']:>10.1f}" for n in names)
          + f" {r['default_fraction_of_plain']:>13.2f} {r['default_time_ratio_vs_k8']:>10.3f}")
  print("\ndecode ms/token")
  for r in decode:
    print(f"batch {r['batch']} k={r['k']}: {r['decode_ms_per_token']:.2f}")
  print("\ntrain step")
  for r in train_stats:
    print(f"k_train={r['k_train']}: {r['tokens_per_s']:,.0f} tok/s")
  print(f"\nwrote {ARGS.out}")


if __name__ == "__main__":
  main()
