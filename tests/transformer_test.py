"""pj.forward against transformers' PyTorch models, and the k modes against each other."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import phds_jax as pj
from conftest import HF_VARIANTS, hf_logits, set_hf_k

TOL = 1e-4


def _load(hf_dirs, variant, **overrides):
  path, model = hf_dirs[variant]
  cfg, params = pj.hf.load_pretrained(path, **overrides)
  return cfg, params, model


def _ks(cfg):
  return sorted({1, 2, cfg.k_pre, cfg.num_experts})


@pytest.mark.parametrize("variant", sorted(HF_VARIANTS))
def test_logits_match_transformers_at_every_k(hf_dirs, variant, tokens):
  cfg, params, model = _load(hf_dirs, variant)
  for k in _ks(cfg):
    ours = np.asarray(pj.forward(cfg, params, tokens, k=k))
    ref = hf_logits(model, tokens, k)
    assert np.abs(ours - ref).max() <= TOL, (variant, k, np.abs(ours - ref).max())
  # The test can fail: k changes the logits far beyond the tolerance.
  assert np.abs(hf_logits(model, tokens, 1) - hf_logits(model, tokens, cfg.num_experts)).max() > 100 * TOL


@pytest.mark.parametrize("variant", ["olmoe_gqa_clip_norm", "qwen_sparse_step", "qwen3_sparse_step", "mixtral_gqa"])
def test_per_layer_k_matches_transformers(hf_dirs, variant, tokens):
  cfg, params, model = _load(hf_dirs, variant)
  ks = tuple(range(1, len(cfg.moe_layer_indices) + 1))
  if len(ks) == 1:
    ks = (3,)
  ours = np.asarray(pj.forward(cfg, params, tokens, k=ks))
  assert np.abs(ours - hf_logits(model, tokens, list(ks))).max() <= TOL


@pytest.mark.parametrize("variant", ["olmoe_gqa_clip_norm", "qwen_norm_tied", "qwen3_bias_tied", "mixtral_gqa"])
def test_traced_k_equals_static_k(hf_dirs, variant, tokens):
  cfg, params, _ = _load(hf_dirs, variant)
  k_max = cfg.num_experts
  for k in _ks(cfg):
    static = np.asarray(pj.forward(cfg, params, tokens, k=k))
    traced = np.asarray(pj.forward(cfg, params, tokens, k=jnp.int32(k), k_max=k_max))
    np.testing.assert_allclose(traced, static, atol=1e-5, rtol=0)
  per_seq = np.asarray(pj.forward(cfg, params, tokens, k=jnp.array([1, 2], jnp.int32), k_max=k_max))
  np.testing.assert_allclose(per_seq[0], np.asarray(pj.forward(cfg, params, tokens, k=1))[0], atol=1e-5)
  np.testing.assert_allclose(per_seq[1], np.asarray(pj.forward(cfg, params, tokens, k=2))[1], atol=1e-5)


def test_traced_k_compiles_once(hf_dirs, tokens):
  cfg, params, _ = _load(hf_dirs, "olmoe_gqa_clip_norm")
  forward = jax.jit(lambda p, t, k: pj.forward(cfg, p, t, k=k, k_max=cfg.num_experts))
  for k in range(1, cfg.num_experts + 1):
    forward(params, tokens, jnp.int32(k))
  assert forward._cache_size() == 1


def test_traced_per_layer_k_equals_static_per_layer_k(hf_dirs, tokens):
  cfg, params, _ = _load(hf_dirs, "qwen_norm_tied")
  static = np.asarray(pj.forward(cfg, params, tokens, k=(1, 4)))
  traced = pj.forward(cfg, params, tokens, k=(jnp.int32(1), jnp.array([4, 4])), k_max=cfg.num_experts)
  np.testing.assert_allclose(np.asarray(traced), static, atol=1e-5)
  mixed = pj.forward(cfg, params, tokens, k=(1, jnp.int32(4)), k_max=cfg.num_experts)
  np.testing.assert_allclose(np.asarray(mixed), static, atol=1e-5)
  with pytest.raises(ValueError, match=r"k\[1\] array values must lie in \[1, k_max=4\]"):
    pj.forward(cfg, params, tokens, k=(1, jnp.int32(5)), k_max=4)


def test_uniform_per_layer_k_equals_global_k(hf_dirs, tokens):
  cfg, params, _ = _load(hf_dirs, "qwen_norm_tied")
  n = len(cfg.moe_layer_indices)
  np.testing.assert_array_equal(np.asarray(pj.forward(cfg, params, tokens, k=(3,) * n)),
                                np.asarray(pj.forward(cfg, params, tokens, k=3)))


@pytest.mark.parametrize("variant", sorted(HF_VARIANTS))
def test_soft_mask_equals_hard_top_k(hf_dirs, variant, tokens):
  """Soft-masked at k (compute at k_pre, ranks >= k weighted 1e-6) equals transformers' hard top-k at k: every
  k through one traced program, and a static k = 1 (the same masking code with k a Python int)."""
  cfg, params, model = _load(hf_dirs, variant)
  for k in range(1, cfg.k_pre + 1):
    soft = pj.forward(cfg, params, tokens, k=jnp.int32(k), k_max=cfg.k_pre, soft_mask_eps=1e-6)
    assert np.abs(np.asarray(soft) - hf_logits(model, tokens, k)).max() <= TOL, (variant, k)
  static = np.asarray(pj.forward(cfg, params, tokens, k=1, soft_mask_eps=1e-6))
  assert np.abs(static - hf_logits(model, tokens, 1)).max() <= TOL


def test_soft_mask_with_large_eps_differs(hf_dirs, tokens):
  cfg, params, _ = _load(hf_dirs, "olmoe_plain_bias")
  hard = np.asarray(pj.forward(cfg, params, tokens, k=1))
  soft = np.asarray(pj.forward(cfg, params, tokens, k=1, soft_mask_eps=0.2))
  assert np.abs(hard - soft).max() > 1e-2


@pytest.mark.parametrize("variant", ["olmoe_gqa_clip_norm", "qwen_sparse_step", "qwen3_sparse_step", "mixtral_gqa"])
def test_load_balance_loss_matches_transformers(hf_dirs, variant, tokens):
  import torch

  cfg, params, model = _load(hf_dirs, variant)
  for k in (1, cfg.k_pre):
    set_hf_k(model, k)
    model.num_experts_per_tok = k
    with torch.no_grad():
      out = model(torch.as_tensor(tokens), output_router_logits=True)
    _, aux = pj.forward(cfg, params, tokens, k=k, return_aux=True)
    np.testing.assert_allclose(float(aux["load_balance_loss"]), float(out.aux_loss), rtol=1e-5)
  model.num_experts_per_tok = cfg.k_pre


def test_z_loss_and_expert_counts(hf_dirs, tokens):
  """z-loss is the mean over MoE layers and tokens of logsumexp(router logits)^2 (ST-MoE), the router logits
  being transformers' own; each token counts once for each of its k experts."""
  import torch

  cfg, params, model = _load(hf_dirs, "olmoe_gqa_clip_norm")
  _, aux = pj.forward(cfg, params, tokens, k=2, return_aux=True)
  counts = np.asarray(aux["expert_counts"])
  assert counts.shape == (len(cfg.moe_layer_indices), cfg.num_experts)
  np.testing.assert_allclose(counts.sum(axis=1), tokens.size * 2)
  set_hf_k(model, 2)  # the shared torch model: another test may have left it at another k
  with torch.no_grad():
    router_logits = model(torch.as_tensor(tokens), output_router_logits=True).router_logits
  logits = torch.cat([r.reshape(-1, cfg.num_experts).double() for r in router_logits])
  expected = float(torch.mean(torch.logsumexp(logits, dim=-1) ** 2))
  np.testing.assert_allclose(float(aux["router_z_loss"]), expected, rtol=1e-5)


def test_packed_segments_equal_separate_sequences(hf_dirs):
  cfg, params, _ = _load(hf_dirs, "qwen_sparse_step")
  rng = np.random.RandomState(1)
  a, b = rng.randint(0, 96, (1, 5)), rng.randint(0, 96, (1, 7))
  packed = np.concatenate([a, b, np.zeros((1, 3), int)], axis=1).astype(np.int32)
  segments = np.array([[1] * 5 + [2] * 7 + [0] * 3], np.int32)
  out = np.asarray(pj.forward(cfg, params, packed, k=2, segment_ids=segments))
  np.testing.assert_allclose(out[0, :5], np.asarray(pj.forward(cfg, params, a.astype(np.int32), k=2))[0],
                             atol=1e-5)
  np.testing.assert_allclose(out[0, 5:12], np.asarray(pj.forward(cfg, params, b.astype(np.int32), k=2))[0],
                             atol=1e-5)


def test_bfloat16_forward_close_to_float32(hf_dirs, tokens):
  cfg, params32, _ = _load(hf_dirs, "olmoe_plain_bias")
  _, params16 = pj.hf.load_pretrained(hf_dirs["olmoe_plain_bias"][0], dtype="bfloat16")
  out16 = pj.forward(cfg, params16, tokens, k=2)
  assert out16.dtype == jnp.bfloat16
  out32 = np.asarray(pj.forward(cfg, params32, tokens, k=2))
  assert np.abs(np.asarray(out16, np.float32) - out32).max() < 0.1 * np.abs(out32).max()


@pytest.mark.parametrize("kwargs, message", [
    (dict(k=0), r"k=0 is out of range: it must lie in \[1, 8\]"),
    (dict(k=9), r"k=9 is out of range"),
    (dict(k=True), r"k=True must be None, an int"),
    (dict(k=2.0), r"k=2.0 must be None, an int"),
    (dict(k=(1,)), r"per-layer k has 1 entries; the model has 2 MoE layers"),
    (dict(k=(1, 9)), r"k\[1\]=9 is out of range"),
    (dict(k=3, k_max=2), r"k=3 is out of range: it must lie in \[1, 2\]"),
    (dict(k=jnp.int32(2)), r"pass a static k_max"),
    (dict(k=np.array(2), k_max=9), r"k_max=9 is out of range"),
    (dict(k=np.array(5, np.int32), k_max=4), r"k array values must lie in \[1, k_max=4\]"),
    (dict(k=np.array([1, 2, 3], np.int32), k_max=4), r"shape \[batch\]=\(2,\)"),
    (dict(k=np.array(2.0), k_max=4), r"integer dtype"),
    (dict(k=2, soft_mask_eps=0.0), r"soft_mask_eps=0.0 must be a float in \(0, 1\)"),
])
def test_invalid_k_raises_value_error(kwargs, message, tokens):
  cfg = pj.preset("tiny-olmoe")
  params = jax.eval_shape(lambda: pj.init_params(cfg, jax.random.key(0)))  # no compute needed
  with pytest.raises(ValueError, match=message):
    pj.forward(cfg, params, tokens, **kwargs)


def test_unknown_expert_backend_is_refused_before_compiling(tokens):
  cfg = pj.preset("tiny-olmoe")
  params = jax.eval_shape(lambda: pj.init_params(cfg, jax.random.key(0)))
  with pytest.raises(ValueError, match=r"expert_backend='magic'; choose one of \('auto', 'reference'"):
    pj.forward(cfg, params, tokens, expert_backend="magic")
  with pytest.raises(ValueError, match="expert_backend='magic'"):
    pj.generate(cfg, params, [[3, 4]], max_new_tokens=2, expert_backend="magic")


def test_invalid_tokens_raise(tokens):
  cfg = pj.preset("tiny-olmoe")
  params = jax.eval_shape(lambda: pj.init_params(cfg, jax.random.key(0)))
  with pytest.raises(ValueError, match="tokens must be an integer array"):
    pj.forward(cfg, params, tokens.astype(np.float32))
  with pytest.raises(ValueError, match="segment_ids must have the shape of tokens"):
    pj.forward(cfg, params, tokens, segment_ids=np.ones((1, 3), np.int32))


@pytest.mark.parametrize("variant", ["olmoe_gqa_clip_norm", "qwen_sparse_step"])
def test_expert_backends_give_the_same_model(hf_dirs, variant, tokens):
  path, _ = hf_dirs[variant]
  outputs = {}
  cfg, params = pj.load(path)
  for backend in ("reference", "auto", "chunked", "sorted", "ragged"):
    outputs[backend] = [np.asarray(pj.forward(cfg, params, tokens, k=k, expert_backend=backend))
                        for k in (1, cfg.k_pre)]
    outputs[backend].append(np.asarray(pj.forward(cfg, params, tokens, k=jnp.array([1, 3]), k_max=3,
                                                  expert_backend=backend)))
  for backend in ("auto", "chunked", "sorted", "ragged"):
    for ours, ref in zip(outputs[backend], outputs["reference"]):
      np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("length, chunk", [(300, 128), (256, 64), (130, 128)])
def test_causal_query_chunks_equal_full_attention(length, chunk):
  """Chunked self-attention (keys up to each chunk's end) equals the full L x L product, packing included."""
  from phds_jax.model import layers

  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (2, 2, 3, length, 16))  # [B, KV, G, L, D]
  k, v = (jax.random.normal(key, (2, 2, length, 16)) for key in ks[1:])
  segments = np.ones((2, length), np.int32)
  segments[0, length // 3:] = 2  # two packed examples
  segments[1, -7:] = 0  # right padding
  mask = layers.attention_mask(jnp.asarray(segments))
  attend = jax.jit(layers.attend, static_argnums=(4, 5))  # one program each, not op by op
  full = attend(q, k, v, mask, 0.25, None)
  chunked = attend(q, k, v, mask, 0.25, chunk)
  np.testing.assert_allclose(chunked, full, atol=1e-6, rtol=1e-6)
