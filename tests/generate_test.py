"""pj.generate: greedy output equals transformers' generate at the same k; per-prompt k; sampling; errors."""

import numpy as np
import pytest

import phds_jax as pj
from conftest import set_hf_k

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [40]]


def _hf_greedy(model, prompts, k, max_new, eos=None):
  import torch

  set_hf_k(model, k)
  width = max(map(len, prompts))
  ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
  with torch.no_grad():
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                         eos_token_id=eos, pad_token_id=0)
  rows = out[:, width:].tolist()
  if eos is not None:  # keep up to and including the first eos, as pj.generate returns
    rows = [r[:r.index(eos) + 1] if eos in r else r for r in rows]
  return rows


@pytest.mark.parametrize("variant", ["olmoe_gqa_clip_norm", "qwen_sparse_step", "qwen_norm_tied",
                                     "qwen3_sparse_step", "mixtral_gqa"])
def test_greedy_generation_matches_transformers(hf_dirs, variant):
  """At k = 1 and k_pre, through one program (k traced per prompt; the static-k program is checked against
  transformers in test_stop_tokens_end_each_prompt)."""
  path, model = hf_dirs[variant]
  cfg, params = pj.hf.load_pretrained(path)
  for k in (1, cfg.k_pre):
    ours = pj.generate(cfg, params, PROMPTS, max_new_tokens=12, k=[k] * len(PROMPTS), k_max=cfg.k_pre,
                       stop_tokens=[])
    assert ours == _hf_greedy(model, PROMPTS, k, 12), (variant, k)


def test_stop_tokens_end_each_prompt(hf_dirs):
  path, model = hf_dirs["olmoe_gqa_clip_norm"]
  cfg, params = pj.hf.load_pretrained(path)
  free = pj.generate(cfg, params, PROMPTS, max_new_tokens=12, k=2, stop_tokens=[])
  stop = free[0][3]
  stopped = pj.generate(cfg, params, PROMPTS, max_new_tokens=12, k=2, stop_tokens=[stop])
  for full, cut in zip(free, stopped):
    expected = full[:full.index(stop) + 1] if stop in full else full
    assert cut == expected
  assert stopped == _hf_greedy(model, PROMPTS, 2, 12, eos=stop)


def test_per_prompt_k_equals_separate_calls(hf_dirs):
  cfg, params = pj.hf.load_pretrained(hf_dirs["qwen_norm_tied"][0])
  mixed = pj.generate(cfg, params, PROMPTS, max_new_tokens=8, k=[1, 4, 2], stop_tokens=[])
  for i, k in enumerate([1, 4, 2]):
    assert mixed[i] == pj.generate(cfg, params, PROMPTS, max_new_tokens=8, k=k, stop_tokens=[])[i]


def test_sampling_is_seeded_and_top_p_one_token_is_greedy(hf_dirs):
  cfg, params = pj.hf.load_pretrained(hf_dirs["olmoe_plain_bias"][0])
  a = pj.generate(cfg, params, PROMPTS, max_new_tokens=10, temperature=1.0, seed=3, stop_tokens=[])
  b = pj.generate(cfg, params, PROMPTS, max_new_tokens=10, temperature=1.0, seed=3, stop_tokens=[])
  c = pj.generate(cfg, params, PROMPTS, max_new_tokens=10, temperature=1.0, seed=4, stop_tokens=[])
  assert a == b and a != c
  nucleus = pj.generate(cfg, params, PROMPTS, max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=5,
                        stop_tokens=[])
  assert nucleus == pj.generate(cfg, params, PROMPTS, max_new_tokens=10, stop_tokens=[])


def test_bad_arguments(hf_dirs):
  cfg, params = pj.hf.load_pretrained(hf_dirs["olmoe_plain_bias"][0])
  with pytest.raises(ValueError, match=r"prompts\[1\] must be a non-empty list of token ids in \[0, 96\)"):
    pj.generate(cfg, params, [[1], [500]])
  with pytest.raises(ValueError, match="k has 1 entries; pass one int, or one per prompt"):
    pj.generate(cfg, params, [[1], [2]], k=[1])
  with pytest.raises(ValueError, match=r"k=9 is out of range"):
    pj.generate(cfg, params, [[1]], k=9)
  with pytest.raises(ValueError, match="max_new_tokens=0"):
    pj.generate(cfg, params, [[1]], max_new_tokens=0)


def test_long_prompts_are_cut_from_the_left(hf_dirs, caplog):
  cfg, params = pj.hf.load_pretrained(hf_dirs["olmoe_plain_bias"][0])
  cfg = cfg.replace(max_position_embeddings=32)
  long_prompt = list(np.arange(40) % 90)
  out = pj.generate(cfg, params, [long_prompt], max_new_tokens=4, stop_tokens=[])
  assert len(out[0]) == 4 and "keeping the last 28" in caplog.text
  assert out == pj.generate(cfg, params, [long_prompt[-28:]], max_new_tokens=4, stop_tokens=[])
