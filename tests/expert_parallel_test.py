"""Expert parallelism on 8 CPU devices: the same logits and gradients as one device, and no device ever
gathers all the experts' weights."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

_SCRIPT = textwrap.dedent("""
    import json, re
    import jax, jax.numpy as jnp, numpy as np
    import phds_jax as pj
    from phds_jax.plan import programs as plan
    from phds_jax.model import layout, sharding

    cfg = pj.preset("tiny-olmoe").replace(num_experts=8, num_experts_per_tok=2, vocab_size=64, num_hidden_layers=1)
    params = pj.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, cfg.vocab_size)

    def loss(params, backend, k):
      logits = pj.forward(cfg, params, tokens, k=k, expert_backend=backend).astype(jnp.float32)
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1))

    step = jax.jit(jax.value_and_grad(loss), static_argnums=(1, 2))
    out = {"mismatch": [], "expert_gathers": {}, "gathers": {}}
    # (the 8-device training test runs the reference backend expert-parallel too)
    cases = {("fsdp", 4): [("chunked", 1), ("ragged", 2), ("sorted", 2)], ("tensor", 2): [("chunked", 2)]}
    for (other, experts_axis), runs in cases.items():
      mesh_shape = {"expert": experts_axis, other: 2, **({"fsdp": 2} if other == "tensor" else {})}
      mesh = sharding.make_mesh(mesh_shape)
      with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        sharded = jax.device_put(params, jax.tree_util.tree_map_with_path(
            lambda path, x: layout.layout_sharding(mesh, cfg)(sharding.path_keys(path), x.shape), params))
        for backend, k in runs:
          (l1, g1), (l8, g8) = step(params, backend, k), step(sharded, backend, k)
          diff = max([abs(float(l1 - l8))] + [float(jnp.max(jnp.abs(a - b))) for a, b in
                                              zip(jax.tree.leaves(g1), jax.tree.leaves(g8))])
          if diff > 2e-5:
            out["mismatch"].append([str(mesh_shape), backend, k, diff])
        hlo = step.lower(sharded, "chunked", 2).compile().as_text()
      name = json.dumps(mesh_shape)
      # an all-gather whose float result holds every expert ([E, ., .], whatever else stays split): all the
      # experts' weights on one device, which expert parallelism exists to avoid (token ids are integers)
      results = re.findall(r"= (?:f32|bf16|f16)\\[([\\d,]+)\\]\\S* all-gather(?:-start)?\\(", hlo)
      full = [r for r in results if len(r.split(",")) == 3 and int(r.split(",")[0]) == cfg.num_experts]
      out["expert_gathers"][name] = len(full)
      out["gathers"][name] = plan.collective_bytes(hlo).get("all-gather", 0)
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_expert_parallel_matches_one_device_and_never_gathers_all_experts():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8")
  out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["mismatch"] == [], result
  assert all(n == 0 for n in result["expert_gathers"].values()), result
  assert all(b > 0 for b in result["gathers"].values())  # tokens and FSDP blocks are gathered
