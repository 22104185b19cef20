"""Loading holds one copy of the model in host memory (plus one tensor in flight), never two."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np

import phds_jax as pj

# Linux: writing 5 to clear_refs resets the peak RSS (VmHWM), so the peak of the load alone is measured.
_MEASURE = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp
    import phds_jax as pj

    def status_kb(field):
      for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
          return int(line.split()[1])

    jnp.ones(4).block_until_ready()
    open("/proc/self/clear_refs", "w").write("5")
    base = status_kb("VmRSS")
    cfg, params = pj.hf.load_pretrained(sys.argv[1])
    jax.block_until_ready(params)
    print((status_kb("VmHWM") - base) * 1024)
""")


def test_load_peak_host_memory_is_about_one_model(tmp_path):
  cfg = pj.preset("tiny-olmoe").replace(hidden_size=256, num_attention_heads=4, num_key_value_heads=4,
                                        num_experts=16, moe_intermediate_size=1024, intermediate_size=1024,
                                        num_hidden_layers=4, vocab_size=512)
  shapes = jax.eval_shape(lambda: pj.init_params(cfg, jax.random.key(0)))
  rng = np.random.default_rng(0)  # numpy: random values without compiling the model's initialiser
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), shapes)
  model_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  assert model_bytes > 200e6
  pj.hf.save_pretrained(cfg, params, str(tmp_path / "m"))
  del params
  out = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "m")], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-2000:]
  peak = int(out.stdout.strip().splitlines()[-1])
  largest = max(x.size for x in jax.tree.leaves(shapes))
  # params themselves, plus the tensor being converted and its device copy
  assert 0.9 * model_bytes < peak < model_bytes + 3 * 4 * largest + 32e6, (peak, model_bytes)
