"""A short training run on one accelerator: tokens/s, MFU from the FLOP model, peak device memory.

  python benchmarks/gpu_train_check.py --out gpu_train.json     # (benchmarks/gpu_check.sh runs it)

Model: OLMoE's shapes with 4 decoder layers instead of 16 (hidden 2048, 64 experts of 1024, k = 8, vocab
50304), bfloat16 compute over float32 parameters, the trainer's loss (token NLL + router losses) with
traced k at k_max = 8 and AdamW; batch --batch x --seq tokens, --steps timed steps after one compiling
step. MFU = model FLOPs per step (plan/cost.py: forward x 3 for forward + backward) / step time / the
chip's dense bfloat16 peak (a table of NVIDIA data-sheet figures; unknown chips give no MFU).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import optax

import phds_jax as pj
from phds_jax.model import losses
from phds_jax.plan.cost import forward_flops_per_token

# dense bfloat16 TFLOP/s per chip (data sheets, without sparsity)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="gpu_train.json")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=1024)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--expert_backend", default="auto")
  p.add_argument("--preset", default="olmoe-1b-7b-0125", help="model shapes (tiny-olmoe: a smoke run on CPU)")
  args = p.parse_args()
  cfg = pj.preset(args.preset).replace(num_hidden_layers=args.layers)
  params = pj.init_params(cfg, jax.random.key(0))
  n_moe = len(cfg.moe_layer_indices)
  run = losses.RunSpec(k=(jnp.int32(cfg.k_pre),) * n_moe, k_max=cfg.k_pre, expert_backend=args.expert_backend)
  optimizer = optax.adamw(1e-4)

  @jax.jit
  def step(params, opt_state, batch):
    def loss(params):
      compute = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
      terms = losses.nll_and_router_losses(cfg, compute, batch, run, lb_coef=0.01, z_coef=0.001)
      return terms.token_loss_sum / terms.weight + terms.extra_loss
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, cfg.vocab_size)
  ones = jnp.ones_like(tokens)
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1), "weights": ones.astype(jnp.float32),
           "positions": jnp.broadcast_to(jnp.arange(args.seq), tokens.shape), "segment_ids": ones}
  opt_state = optimizer.init(params)
  start = time.perf_counter()
  params, opt_state, loss = jax.block_until_ready(step(params, opt_state, batch))
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(args.steps):
    params, opt_state, loss = step(params, opt_state, batch)
  jax.block_until_ready(loss)
  step_s = (time.perf_counter() - start) / args.steps
  device = jax.devices()[0]
  flops = 3 * forward_flops_per_token(cfg, cfg.k_pre, (args.seq + 1) / 2) * args.batch * args.seq
  peak = next((v for name, v in PEAK_BF16_TFLOPS.items() if name in device.device_kind), None)
  stats = device.memory_stats() or {}
  out = {"device": device.device_kind, "platform": device.platform, "layers": args.layers,
         "expert_backend": pj.model.transformer.resolve_expert_backend(args.expert_backend),
         "batch": args.batch, "seq": args.seq, "first_step_s": compile_s, "step_s": step_s,
         "tokens_per_s": args.batch * args.seq / step_s, "model_tflops_per_s": flops / step_s / 1e12,
         "mfu": flops / step_s / (peak * 1e12) if peak else None,
         "peak_memory_gib": stats.get("peak_bytes_in_use", 0) / 2**30, "final_loss": float(loss)}
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(out, f, indent=2)
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  main()
