"""Loading holds one copy of the model in host memory (plus one tensor in flight), never two; loading onto a
mesh of 8 CPU devices places only each device's block on it."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import phds_jax as pj

# Linux: writing 5 to clear_refs resets the peak RSS (VmHWM), so the peak of the load alone is measured.
# Prints the peak, then for the sharded load each device's bytes and whether every block is the right one.
_MEASURE = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    import phds_jax as pj
    from phds_jax.model import sharding

    def status_kb(field):
      for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
          return int(line.split()[1])

    mesh = sharding.make_mesh({"fsdp": 4, "expert": 2}) if sys.argv[2] == "mesh" else None
    jnp.ones(4).block_until_ready()
    open("/proc/self/clear_refs", "w").write("5")
    base = status_kb("VmRSS")
    cfg, params = pj.load(sys.argv[1], sharding=mesh)
    jax.block_until_ready(params)
    print((status_kb("VmHWM") - base) * 1024)
    if mesh is not None:
      per_device = {d.id: 0 for d in jax.devices()}
      for leaf in jax.tree.leaves(params):
        for shard in leaf.addressable_shards:
          assert shard.data.shape == leaf.sharding.shard_shape(leaf.shape), (shard.data.shape, leaf.shape)
          per_device[shard.device.id] += shard.data.nbytes
      print(" ".join(str(per_device[i]) for i in sorted(per_device)))
      _, full = pj.load(sys.argv[1])
      same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(params),
                                                                              jax.tree.leaves(full)))
      print(same)
""")


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
  """A ~200 MB float32 HF model directory, and its parameter shapes."""
  cfg = pj.preset("tiny-olmoe").replace(hidden_size=256, num_attention_heads=4, num_key_value_heads=4,
                                        num_experts=16, moe_intermediate_size=1024, intermediate_size=1024,
                                        num_hidden_layers=4, vocab_size=512)
  shapes = jax.eval_shape(lambda: pj.init_params(cfg, jax.random.key(0)))
  rng = np.random.default_rng(0)  # numpy: random values without compiling the model's initialiser
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), shapes)
  path = str(tmp_path_factory.mktemp("memory") / "m")
  pj.hf.save_pretrained(cfg, params, path)
  return path, shapes


def _measure(path: str, placement: str, devices: int = 1) -> list[str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}")
  out = subprocess.run([sys.executable, "-c", _MEASURE, path, placement], capture_output=True, text=True,
                       timeout=300, env=env)
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout.strip().splitlines()[-3 if placement == "mesh" else -1:]


def test_load_peak_host_memory_is_about_one_model(big_model):
  path, shapes = big_model
  model_bytes = sum(4 * x.size for x in jax.tree.leaves(shapes))
  assert model_bytes > 200e6
  peak = int(_measure(path, "default")[0])
  largest = max(x.size for x in jax.tree.leaves(shapes))
  # params themselves, plus the tensor being converted and its device copy
  assert 0.9 * model_bytes < peak < model_bytes + 3 * 4 * largest + 32e6, (peak, model_bytes)


def test_sharded_load_places_only_each_devices_block(big_model):
  """8 CPU devices, mesh fsdp=4 x expert=2: every device holds its block only (about 1/8 of the experts and
  1/4 of the rest), the values equal an unsharded load, and the process's peak stays within 1.5x what its
  devices hold plus the largest tensor (the blocks are read one at a time, never the whole model twice)."""
  path, shapes = big_model
  model_bytes = sum(4 * x.size for x in jax.tree.leaves(shapes))
  peak, per_device, same = _measure(path, "mesh", devices=8)
  per_device = [int(b) for b in per_device.split()]
  assert same == "True"
  assert len(per_device) == 8 and max(per_device) < model_bytes / 6, (per_device, model_bytes)
  share = sum(per_device)  # one process: all 8 devices are its own
  largest = 4 * max(x.size for x in jax.tree.leaves(shapes))
  assert int(peak) < 1.5 * share + largest, (int(peak), share, largest)
