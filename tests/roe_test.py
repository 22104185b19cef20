"""Roster of Experts in pj.forward: an ensemble of Gumbel-noised routings as extra batch rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import phds_jax as pj
from phds_jax.eval.generate import lower_generate


def _model(variant, hf_dirs):
  return pj.hf.load_pretrained(hf_dirs[variant][0])


def test_one_deterministic_member_is_log_softmax_of_todays_logits(hf_dirs, tokens):
  cfg, params = _model("qwen3_sparse_step", hf_dirs)  # a family that renormalises the top k
  for k, k_max in ((2, None), (jnp.array([1, 3], jnp.int32), 4)):  # static and per-row traced k
    plain = jax.nn.log_softmax(pj.forward(cfg, params, tokens, k=k, k_max=k_max).astype(jnp.float32), -1)
    for roe in (pj.RoE(), pj.RoE(members=1, tau=2.0, seed=3)):  # member 0 never gets noise
      np.testing.assert_array_equal(pj.forward(cfg, params, tokens, k=k, k_max=k_max, roe=roe), plain)


def test_members_are_seeded_noisy_routings_mixed_with_the_deterministic_one(hf_dirs, tokens):
  cfg, params = _model("olmoe_gqa_clip_norm", hf_dirs)
  roe = pj.RoE(members=4, tau=1.0, seed=0)
  ens = np.asarray(pj.forward(cfg, params, tokens, k=2, roe=roe))
  assert ens.shape == (*tokens.shape, cfg.vocab_size) and ens.dtype == np.float32
  np.testing.assert_allclose(np.exp(ens).sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(pj.forward(cfg, params, tokens, k=2, roe=roe), ens)  # same seed, same output
  other = np.asarray(pj.forward(cfg, params, tokens, k=2, roe=pj.RoE(members=4, tau=1.0, seed=1)))
  assert np.abs(other - ens).max() > 1e-3  # another seed, other routings
  p_det = np.exp(jax.nn.log_softmax(pj.forward(cfg, params, tokens, k=2).astype(jnp.float32), -1))
  assert np.all(np.exp(ens) >= p_det / 4 - 1e-6)  # member 0 (deterministic) is a quarter of the mixture
  assert np.abs(np.exp(ens) - p_det).max() > 1e-3  # and the others differ from it
  # tau = 0 in every layer: every member is the deterministic model
  zero = pj.forward(cfg, params, tokens, k=2, roe=pj.RoE(members=3, tau=(0.0,) * len(cfg.moe_layer_indices)))
  np.testing.assert_allclose(np.exp(zero), p_det, atol=1e-6)


def test_roe_composes_with_the_soft_mask(hf_dirs, tokens):
  cfg, params = _model("qwen_sparse_step", hf_dirs)
  soft = pj.forward(cfg, params, tokens, k=1, soft_mask_eps=1e-6, roe=pj.RoE(members=2, tau=0.5, seed=0))
  hard = pj.forward(cfg, params, tokens, k=1, roe=pj.RoE(members=2, tau=0.5, seed=0))
  assert np.all(np.isfinite(soft)) and np.abs(np.asarray(soft) - np.asarray(hard)).max() < 1e-3


@pytest.mark.parametrize("roe, message", [
    (dict(members=0), "members=0 must be an int >= 1"),
    (dict(members=2, tau=-0.1), "tau=-0.1 must be a float >= 0"),
    (dict(members=2, tau=(0.1, float("nan"))), "must be a float >= 0"),
])
def test_bad_roe_arguments_are_value_errors(roe, message):
  with pytest.raises(ValueError, match=message):
    pj.RoE(**roe)


def test_a_tau_per_layer_must_match_the_moe_layers(hf_dirs, tokens):
  cfg, params = _model("olmoe_gqa_clip_norm", hf_dirs)
  n = len(cfg.moe_layer_indices)
  with pytest.raises(ValueError, match=f"RoE tau has {n + 1} entries; the model has {n} MoE layers"):
    pj.forward(cfg, params, tokens, roe=pj.RoE(members=2, tau=(0.5,) * (n + 1)))
  with pytest.raises(ValueError, match="return_aux is not available"):
    pj.forward(cfg, params, tokens, return_aux=True, roe=pj.RoE(members=2, tau=0.5))


def test_scoring_and_perplexity_take_an_ensemble(hf_dirs, tmp_path):
  from conftest import write_toy_sft, write_toy_tokenizer
  from phds_jax.data import pipeline as data
  from phds_jax.eval import scoring as evaluate

  cfg, params = _model("olmoe_gqa_clip_norm", hf_dirs)
  pairs = [([3, 4, 5], [6]), ([7, 8], [9, 10, 11]), ([12], [13, 14])]
  plain = evaluate.continuation_logprobs(cfg, params, pairs, k=2)
  np.testing.assert_allclose(evaluate.continuation_logprobs(cfg, params, pairs, k=2, roe=pj.RoE()), plain,
                             rtol=1e-5)
  noisy = evaluate.continuation_logprobs(cfg, params, pairs, k=2, roe=pj.RoE(members=3, tau=1.0, seed=0))
  assert np.abs(noisy - plain).max() > 1e-4
  tokenizer = data.load_tokenizer(write_toy_tokenizer(tmp_path / "tok"))
  batches = data.eval_batches(data.pack(data.read_sft(write_toy_sft(tmp_path / "s.jsonl", n=8), tokenizer), 64), 4)
  noisy = pj.RoE(members=2, tau=1.0)
  full = evaluate.mean_nll(cfg, params, batches, k=2, roe=noisy)
  # projecting only each member's trained positions to the vocabulary gives the same ensemble NLL
  projected = evaluate.mean_nll(cfg, params, batches, k=2, roe=noisy,
                                max_loss_tokens=evaluate.projected_positions(batches))
  assert projected == pytest.approx(full, rel=1e-5)


def test_scored_positions_alone_give_the_ensembles_log_probs(hf_dirs, tokens):
  from phds_jax.eval import scoring as evaluate

  cfg, params = _model("qwen_norm_tied", hf_dirs)  # a tied head
  roe = pj.RoE(members=3, tau=1.0, seed=2)
  where = np.array([[2, 3, 4], [5, 6, 0]], np.int32)
  weights = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
  targets = np.take_along_axis(tokens, where + 1, axis=1)
  targets[1, 0] = 0  # not the argmax (below), so the greedy check has a False to find
  logp = np.asarray(pj.forward(cfg, params, tokens, k=2, expert_backend="reference", roe=roe))  # every position
  scored = np.take_along_axis(logp, where[..., None], 1)
  targets[0] = scored[0].argmax(-1)  # row 0 continues greedily
  scores, greedy = evaluate._score_batch(cfg, params, tokens, np.ones_like(tokens), where, targets, weights, 2,
                                         "reference", roe, True)  # pylint: disable=protected-access
  want = np.take_along_axis(scored, targets[..., None], 2)[..., 0]
  np.testing.assert_allclose(scores, (want * weights).sum(-1), rtol=1e-5)
  assert list(np.asarray(greedy)) == [True, False]
  programs = evaluate._score_batch._cache_size()  # pylint: disable=protected-access
  other, _ = evaluate._score_batch(cfg, params, tokens, np.ones_like(tokens), where, targets, weights, 2,
                                   "reference", pj.RoE(members=3, tau=0.3, seed=5), True)  # pylint: disable=protected-access
  assert np.abs(np.asarray(other) - np.asarray(scores)).max() > 1e-4
  assert evaluate._score_batch._cache_size() == programs  # pylint: disable=protected-access  (tau, seed traced)


def test_members_attend_to_the_clean_cache_and_their_own_new_keys():
  from phds_jax.model import layers

  rng = np.random.default_rng(0)
  m, b, kv, g, length, slots, d, index = 3, 2, 2, 2, 2, 9, 4, 5
  q = jnp.asarray(rng.normal(size=(m, b, kv, g, length, d)), jnp.float32)
  own_k, own_v = (jnp.asarray(rng.normal(size=(m, b, kv, length, d)), jnp.float32) for _ in range(2))
  past_k, past_v = (jnp.asarray(rng.normal(size=(b, kv, slots, d)), jnp.float32) for _ in range(2))
  kv_valid = jnp.asarray(np.arange(slots)[None, :] >= np.array([[0], [2]]))  # row 1 is left-padded
  mask = layers.cache_attention_mask(kv_valid, index, length)
  got = layers.attend_members(q, own_k, own_v, past_k, past_v, mask & (jnp.arange(slots) < index), d ** -0.5)
  for member in range(m):  # the reference: plain attention over a cache holding this member's own keys
    keys = past_k.at[:, :, index:index + length].set(own_k[member])
    values = past_v.at[:, :, index:index + length].set(own_v[member])
    want = layers.attend(q[member], keys, values, mask, d ** -0.5)
    np.testing.assert_allclose(got[member], want, rtol=1e-5, atol=1e-6)


def test_ensembled_generation_decodes_members_against_one_clean_cache(hf_dirs):
  cfg, params = _model("olmoe_gqa_clip_norm", hf_dirs)
  prompts, n, k = [[5, 6, 7, 8, 9], [10, 11, 12], [40]], len(cfg.moe_layer_indices), [1, 4, 2]  # k per prompt
  plain = pj.generate(cfg, params, prompts, max_new_tokens=6, k=k, stop_tokens=[])
  assert pj.generate(cfg, params, prompts, max_new_tokens=6, k=k, stop_tokens=[],
                     roe=pj.RoE(members=4, tau=0.0)) == plain  # deterministic members: today's program
  # tau ~ 0 takes the ensemble path (M x B rows per step, clean cache) with every member routed like member 0
  assert pj.generate(cfg, params, prompts, max_new_tokens=6, k=k, stop_tokens=[],
                     roe=pj.RoE(members=3, tau=1e-30)) == plain
  noisy = pj.RoE(members=3, tau=(2.0,) * n, seed=0)  # the same program: tau and seed are traced
  # the program's KV cache is [B, S, KV, D] (prompts and new tokens bucketed to 16 each), never [M * B, ...]
  text = lower_generate(cfg, params, prompts, max_new_tokens=6, k=k, roe=noisy).as_text()
  kv, d = cfg.num_key_value_heads, cfg.resolved_head_dim
  assert f"tensor<3x32x{kv}x{d}xf32>" in text and f"tensor<9x32x{kv}x{d}xf32>" not in text
  ens = pj.generate(cfg, params, prompts, max_new_tokens=6, k=k, stop_tokens=[], roe=noisy)
  assert ens == pj.generate(cfg, params, prompts, max_new_tokens=6, k=k, stop_tokens=[], roe=noisy)
  assert ens != plain
  with pytest.raises(ValueError, match="must be a pj.RoE"):
    pj.generate(cfg, params, prompts, roe=4)
  with pytest.raises(ValueError, match=f"RoE tau has {n + 1} entries"):
    pj.generate(cfg, params, prompts, roe=pj.RoE(members=2, tau=(0.5,) * (n + 1)))


def test_members_over_a_whole_sequence_see_the_clean_keys_before_them_and_their_own_at_their_position():
  from phds_jax.model import layers

  rng = np.random.default_rng(1)
  m, b, kv, g, length, d = 3, 2, 2, 2, 5, 4
  q = jnp.asarray(rng.normal(size=(m, b, kv, g, length, d)), jnp.float32)
  own_k, own_v = (jnp.asarray(rng.normal(size=(m, b, kv, length, d)), jnp.float32) for _ in range(2))
  mask = layers.attention_mask(jnp.asarray([[1] * length, [1, 1, 1, 2, 2]]))  # row 1 holds two segments
  before = jnp.tril(jnp.ones((length, length), jnp.bool_), -1)
  got = layers.attend_members(q, own_k, own_v, own_k[0], own_v[0], mask & before, d ** -0.5, own="diagonal")
  for member in range(m):
    for t in range(length):  # the reference: member 0's keys with this member's own at position t
      keys, values = own_k[0].at[:, :, t].set(own_k[member][:, :, t]), own_v[0].at[:, :, t].set(own_v[member][:, :, t])
      want = layers.attend(q[member][:, :, :, t:t + 1], keys, values, mask[:, :, :, t:t + 1], d ** -0.5)
      np.testing.assert_allclose(got[member][:, :, :, t:t + 1], want, rtol=1e-5, atol=1e-6)


def test_forward_scores_each_position_as_decoding_against_the_clean_cache_does(hf_dirs, tokens):
  """pj.forward's ensemble at position t == one step of the M members at t against the deterministic cache
  (generate's algorithm: the step sees the cached slots before t), under the same noise (one key per row: a
  row draws the same Gumbel noise at every position). The cache holds the whole sequence, prefilled once;
  a step at t never sees its slots from t on, so it is the cache of 0..t-1."""
  from phds_jax.model import transformer

  cfg, params = _model("olmoe_gqa_clip_norm", hf_dirs)
  members, (batch, length) = 3, tokens.shape
  roe = pj.RoE(members=members, tau=2.0)
  plan = transformer.plan_k(cfg, 2, None, None, batch)
  taus = roe.row_taus(len(cfg.moe_layer_indices), batch)
  keys = jax.random.split(jax.random.key(7), members * batch)
  decoder = transformer.Decoder(cfg)
  positions = jnp.tile(jnp.arange(length, dtype=jnp.int32), (batch, 1))
  run = lambda tok, pos, **kw: decoder.apply({"params": params}, tok, pos, jnp.ones_like(tok), layer_k=plan.static,
                                             layer_width=plan.widths, **kw)
  whole, _ = run(roe.tile(jnp.asarray(tokens)), roe.tile(positions), roe_taus=taus, roe_key=keys,
                 roe_members=members)  # [M * B, L, V]
  assert np.abs(np.asarray(whole[batch:] - jnp.tile(whole[:batch], (members - 1, 1, 1)))).max() > 1e-3  # noise acts
  kv_valid = jnp.ones((batch, length), jnp.bool_)
  _, _, cache = run(jnp.asarray(tokens), positions, cache=transformer.init_cache(cfg, batch, length, jnp.float32),
                    cache_index=0, kv_valid=kv_valid)
  step_at = jax.jit(lambda t: run(roe.tile(jax.lax.dynamic_slice_in_dim(jnp.asarray(tokens), t, 1, axis=1)),
                                  roe.tile(jax.lax.dynamic_slice_in_dim(positions, t, 1, axis=1)), cache=cache,
                                  cache_index=t, kv_valid=kv_valid, roe_taus=taus, roe_key=keys)[0])
  for t in range(length):
    step = step_at(jnp.int32(t))
    np.testing.assert_allclose(step[:, 0], whole[:, t], rtol=2e-5, atol=2e-5)
