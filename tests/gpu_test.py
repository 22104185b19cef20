"""On an accelerator (an NVIDIA GPU): parity with transformers, every expert backend against the reference,
scanned against unrolled layers. Marked `accelerator`: CI deselects them; benchmarks/gpu_check.sh runs them
(`pytest -m accelerator tests/gpu_test.py`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import phds_jax as pj
from conftest import HF_VARIANTS, hf_logits

pytestmark = pytest.mark.accelerator


@pytest.fixture(scope="module", autouse=True)
def accelerator():
  """Every test here runs on the accelerator at float32 matmul precision (no TF32), or fails saying there is none."""
  assert jax.default_backend() in ("gpu", "cuda", "rocm", "tpu"), (
      f"no accelerator: JAX's default backend is {jax.default_backend()!r} (these tests are for a GPU machine)")
  with jax.default_matmul_precision("highest"):
    yield


@pytest.mark.parametrize("variant", sorted(HF_VARIANTS))
def test_logits_match_transformers_on_the_accelerator(hf_dirs, variant, tokens):
  cfg, params = pj.hf.load_pretrained(hf_dirs[variant][0])
  for k in sorted({1, cfg.k_pre, cfg.num_experts}):
    ours = np.asarray(pj.forward(cfg, params, tokens, k=k))
    np.testing.assert_allclose(ours, hf_logits(hf_dirs[variant][1], tokens, k), atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["olmoe_gqa_clip_norm", "qwen_sparse_step", "mixtral_gqa"])
def test_every_expert_backend_and_both_layer_layouts_agree(hf_dirs, variant, tokens):
  cfg, params = pj.load(hf_dirs[variant][0])
  k_rows = jnp.array([1, 3], jnp.int32)
  reference = np.asarray(pj.forward(cfg, params, tokens, k=k_rows, k_max=3, expert_backend="reference"))
  for backend in ("chunked", "sorted", "ragged"):
    for scan in (True, False):
      ours = pj.forward(cfg, params, tokens, k=k_rows, k_max=3, expert_backend=backend, scan_layers=scan)
      np.testing.assert_allclose(np.asarray(ours), reference, atol=1e-5, rtol=0, err_msg=f"{backend} scan={scan}")
