"""Expert parallelism on 8 CPU devices: the same logits and gradients as one device with either token
dispatch, and no device ever gathers all the experts' weights; the all-to-all stand-in against numpy."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
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
    out = {"mismatch": [], "expert_gathers": {}, "gathers": {}, "all_to_all": {}}
    # (the 8-device training test runs the reference backend expert-parallel too)
    cases = [({"expert": 8}, "all_to_all", [("chunked", 2)]),
             ({"expert": 4, "fsdp": 2}, "all_to_all", [("ragged", 2), ("chunked", 1), ("sorted", 2)]),
             ({"expert": 4, "fsdp": 2}, "all_gather", [("chunked", 2)]),
             ({"expert": 2, "tensor": 2, "fsdp": 2}, "all_to_all", [("chunked", 2)])]
    # one device, no mesh: the plain path
    reference = {run: step(params, *run) for run in {run for _, _, runs in cases for run in runs}}
    for mesh_shape, dispatch, runs in cases:
      mesh = sharding.make_mesh(mesh_shape)
      with sharding.use_mesh(mesh, sharding.DEFAULT_RULES, dispatch):
        sharded = jax.device_put(params, jax.tree_util.tree_map_with_path(
            lambda path, x: layout.layout_sharding(mesh, cfg)(sharding.path_keys(path), x.shape), params))
        hlo = None
        for backend, k in runs:
          jax.clear_caches()  # the dispatch is read when tracing: one program per case
          program = step.lower(sharded, backend, k).compile()
          hlo = hlo or program.as_text()  # the collectives of the case's first program
          (l1, g1), (l8, g8) = reference[(backend, k)], program(sharded)
          diff = max([abs(float(l1 - l8))] + [float(jnp.max(jnp.abs(a - b))) for a, b in
                                              zip(jax.tree.leaves(g1), jax.tree.leaves(g8))])
          if diff > 2e-5:
            out["mismatch"].append([str(mesh_shape), dispatch, backend, k, diff])
      name = json.dumps([mesh_shape, dispatch])
      # an all-gather whose float result holds every expert ([E, ., .], whatever else stays split): all the
      # experts' weights on one device, which expert parallelism exists to avoid (token ids are integers)
      results = re.findall(r"= (?:f32|bf16|f16)\\[([\\d,]+)\\]\\S* all-gather(?:-start)?\\(", hlo)
      full = [r for r in results if len(r.split(",")) == 3 and int(r.split(",")[0]) == cfg.num_experts]
      out["expert_gathers"][name] = len(full)
      out["gathers"][name] = plan.collective_bytes(hlo).get("all-gather", 0)
      out["all_to_all"][name] = plan.collective_bytes(hlo).get("all-to-all", 0)
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
  # on one mesh: the all-to-all dispatch sends tokens by all-to-all (XLA's own resharding uses a few bytes of
  # it either way) and leaves out the token all-gathers of the all-gather dispatch
  mesh = '{"expert": 4, "fsdp": 2}'
  a2a, gather = f'[{mesh}, "all_to_all"]', f'[{mesh}, "all_gather"]'
  assert result["all_to_all"][a2a] > 10 * result["all_to_all"][gather]
  assert result["gathers"][gather] > result["gathers"][a2a] > 0
  assert all(sent > 10 * result["all_to_all"][gather] for name, sent in result["all_to_all"].items()
             if "all_to_all" in name)


def _simulated_exchange(rows, dest, group):
  """The padded stand-in's pack, a numpy all_to_all between `group` simulated devices, a stand-in for the
  experts (2 x row + the receiving device), the way back and unpack: each device's results [A, H]."""
  import jax.numpy as jnp
  from phds_jax.model import expert_parallel as ep

  plans = [ep.send_plan(jnp.asarray(d), group) for d in dest]
  sent = [np.asarray(ep.pack(jnp.asarray(r), p, group)).reshape(group, len(r), -1) for r, p in zip(rows, plans)]
  received = [np.concatenate([sent[i][j] for i in range(group)]) for j in range(group)]  # block i: from device i
  computed = [2 * received[j] + j for j in range(group)]
  back = [np.concatenate([computed[j].reshape(group, len(rows[0]), -1)[i] for j in range(group)])
          for i in range(group)]
  return [np.asarray(ep.unpack(jnp.asarray(b), p, group)) for b, p in zip(back, plans)], received


def test_the_all_to_all_stand_in_sends_each_row_to_its_device_and_back():
  """Rows arrive at their destination device as contiguous blocks, one per sender in device order, each in
  the sender's row order; results come back to the rows they belong to; rows with destination `group`
  (weight 0) are not sent and get 0. No capacity: a block has room for every row of its sender."""
  rng = np.random.default_rng(0)
  group, size = 4, 6
  rows = [rng.normal(size=(size, 3)).astype(np.float32) for _ in range(group)]
  dest = [rng.integers(0, group + 1, size).astype(np.int32) for _ in range(group)]
  dest[0][:] = 2  # every row of device 0 to device 2: the worst case fits
  results, received = _simulated_exchange(rows, dest, group)
  for j in range(group):
    blocks = received[j].reshape(group, size, 3)
    for i in range(group):
      expected = rows[i][dest[i] == j]
      np.testing.assert_array_equal(blocks[i][:len(expected)], expected)
      np.testing.assert_array_equal(blocks[i][len(expected):], 0)
  for i in range(group):
    expected = np.where((dest[i] < group)[:, None], 2 * rows[i] + dest[i][:, None], 0)
    np.testing.assert_allclose(results[i], expected, rtol=1e-6)
