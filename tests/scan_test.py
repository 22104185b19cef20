"""Scanned decoder layers: the same logits, gradients, router statistics and tokens as the unrolled layers
and as one device, on 8 CPU devices; old per-layer checkpoints still load."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

import phds_jax as pj
from conftest import ROOT
from phds_jax.io import checkpoint
from phds_jax.model import layout

_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    import phds_jax as pj
    from phds_jax.model import layout, sharding, transformer

    transformer.MIN_SCAN_LAYERS = 1  # scan every run, however short (the default unrolls runs of 1-2 layers)

    # a dense first layer, then three MoE layers: runs [0] dense, [1, 2, 3] MoE
    cfg = pj.preset("tiny-qwen-moe").replace(vocab_size=64, mlp_only_layers=(0,))
    assert [r.size for r in cfg.layer_runs] == [1, 3]
    params = pj.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (8, 12), 0, cfg.vocab_size)
    k_rows = jnp.array([1, 2, 1, 2, 2, 1, 1, 2], jnp.int32)
    cases = {  # name -> (forward keyword arguments, with gradients, also on 8 devices)
        "static per-layer k (1, 2, 2): two scans": (dict(k=(1, 2, 2)), False, True),
        "traced per-layer k, soft mask, remat=full, chunked backend": (
            dict(k=(k_rows, jnp.int32(1), k_rows), k_max=2, soft_mask_eps=1e-6, remat="full",
                 expert_backend="chunked"), True, True),
        "sorted backend, traced k per row": (dict(k=k_rows, k_max=2, expert_backend="sorted"), False, False),
        "ragged backend": (dict(k=k_rows, k_max=2, expert_backend="ragged"), False, False),
        "reference backend": (dict(k=k_rows, k_max=2, expert_backend="reference"), False, False),
        "RoE, tau per layer": (dict(roe=pj.RoE(members=3, tau=(0.5, 0.0, 1.0), seed=2)), False, True),
    }

    def loss(params, kwargs, scan):
      out = pj.forward(cfg, params, tokens, scan_layers=scan, return_aux="roe" not in kwargs, **kwargs)
      if "roe" in kwargs:
        return out, out
      logits, aux = out
      logp = jax.nn.log_softmax(logits.astype(jnp.float32)[:, :-1])
      nll = -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))
      return nll + 0.1 * aux["load_balance_loss"] + 0.01 * aux["router_z_loss"], (logits, aux)

    def run(params, kwargs, scan, grads):
      bound = lambda p: loss(p, kwargs, scan)  # k_max, backends and remat stay static
      fn = jax.value_and_grad(bound, has_aux=True) if grads else lambda p: (bound(p), None)
      (value, extra), g = jax.jit(fn)(params)
      return jax.tree.map(np.asarray, (value, extra, g))

    def diff(a, b):
      return max([0.0] + [float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))])

    out, reference = {}, {}
    for name, (kwargs, grads, _) in cases.items():  # one device, no mesh: unrolled against scanned
      reference[name] = run(params, kwargs, False, grads)
      out[name] = {"scanned": diff(reference[name], run(params, kwargs, True, grads))}
    mesh = sharding.make_mesh({"fsdp": 2, "expert": 2, "tensor": 2})
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
      sharded = jax.device_put(params, jax.tree_util.tree_map_with_path(
          lambda path, x: layout.layout_sharding(mesh, cfg)(sharding.path_keys(path), x.shape), params))
      for name, (kwargs, grads, on_mesh) in cases.items():
        if on_mesh:
          out[name]["scanned, 8 devices"] = diff(reference[name], run(sharded, kwargs, True, grads))
    # generation: scanned = unrolled tokens, a k per prompt and a sampled Roster-of-Experts ensemble
    prompts = [[3, 5, 7], [11, 2, 9, 4, 8, 1], [6]]
    kw = dict(k=[1, 2, 2], roe=pj.RoE(members=2, tau=0.7, seed=0), temperature=0.8, seed=3)
    got = [pj.generate(cfg, params, prompts, max_new_tokens=6, scan_layers=s, **kw) for s in (True, False)]
    out["generate, k per prompt, RoE"] = {"scanned": 0.0 if got[0] == got[1] else 1.0}
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_scanned_layers_match_unrolled_and_one_device():
  """Float32 logits and router losses within 1e-5 (scanned vs unrolled on one device, and on a 2x2x2 mesh of
  fsdp, expert and tensor) for static per-layer k (a run split in two scans), traced k per row and per layer
  with remat and the chunked backend (gradients too) and RoE; the sorted, ragged and reference backends
  scanned vs unrolled on one device; on a stack with a dense first layer; generated tokens identical. The
  cases without a named backend run what "auto" means here (ragged in this suite: conftest.py)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert len(out) == 7 and sum(len(diffs) for diffs in out.values()) == 10
  bad = {name: d for name, diffs in out.items() for how, d in diffs.items() if d > 1e-5}
  assert not bad, bad


def test_layers_are_stacked_in_runs_of_equal_layers():
  cfg = pj.preset("tiny-qwen-moe")  # layer 2 is dense
  assert [(r.name, r.start, r.stop, r.is_moe, r.moe_start) for r in cfg.layer_runs] == [
      ("layers_0_to_1", 0, 2, True, 0), ("layers_2_to_2", 2, 3, False, 2), ("layers_3_to_3", 3, 4, True, 2)]
  specs = {s.name: s for s in layout.param_layout(cfg)}
  gate = specs["layers_0_to_1/mlp/experts/gate_proj"]
  assert gate.shape == (2, cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
  assert gate.axes == ("layers", "exp", "embed", "mlp") and gate.layers == (0, 1)
  assert specs["layers_2_to_2/mlp/up_proj/kernel"].layers == (2,)
  assert [r.name for r in pj.preset("tiny-olmoe").layer_runs] == ["layers"]


def test_a_per_layer_checkpoint_loads_into_stacked_layers(tmp_path):
  """A model checkpoint written before layers were stacked (layers_0, layers_1, ...) loads as the stacked
  params it holds."""
  cfg = pj.preset("tiny-qwen-moe").replace(vocab_size=64)
  params = pj.init_params(cfg, jax.random.key(0))
  path = checkpoint.save_model(cfg, params, str(tmp_path / "new"))
  per_layer = {}
  for spec in layout.param_layout(cfg):
    value = np.asarray(traverse_util.flatten_dict(params)[spec.path])
    if spec.layers:
      for j, layer in enumerate(spec.layers):
        per_layer[(f"layers_{layer}", *spec.path[1:])] = value[j]
    else:
      per_layer[spec.path] = value
  old = tmp_path / "old"
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(str(old / checkpoint.PARAMS_DIR), traverse_util.unflatten_dict(per_layer))
  (old / checkpoint.CONFIG_FILE).write_text(open(os.path.join(path, checkpoint.CONFIG_FILE)).read())
  _, loaded = checkpoint.load_model(str(old))
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)))
