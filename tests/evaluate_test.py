"""Log-likelihood scoring and multiple-choice accuracy against direct computations."""

import json

import jax
import numpy as np
import pytest

import phds_jax as pj
from phds_jax.eval import scoring as evaluate


@pytest.fixture(scope="module")
def model():
  cfg = pj.preset("tiny-qwen-moe")
  return cfg, pj.init_params(cfg, jax.random.key(0))


def _direct_logprob(cfg, params, context, continuation, k):
  """log p(continuation | context) from one plain forward. The row is right-padded to 32 tokens (causal:
  padding changes no earlier position), so every pair reuses one compiled forward per k."""
  tokens = np.zeros((1, 32), np.int32)
  tokens[0, :len(context) + len(continuation)] = context + continuation
  logp = jax.nn.log_softmax(np.asarray(pj.forward(cfg, params, tokens, k=k))[0], axis=-1)
  return sum(float(logp[len(context) - 1 + i, t]) for i, t in enumerate(continuation))


def test_continuation_logprobs_equal_direct_sums(model):
  cfg, params = model
  pairs = [([5, 6, 7], [8]), ([9, 10], [11, 12, 13]), ([1] * 20, [2, 3])]
  k = 1  # not k_pre: a scorer that ignored k would differ from the direct sums
  assert k != cfg.k_pre
  got = evaluate.continuation_logprobs(cfg, params, pairs, k=k, batch_size=2)
  want = [_direct_logprob(cfg, params, c, x, k) for c, x in pairs]
  np.testing.assert_allclose(got, want, atol=1e-4)


class _CharTokenizer:
  def encode(self, text, add_special_tokens=False):
    return [ord(ch) % 100 + 3 for ch in text]


def test_multiple_choice_picks_the_highest_likelihood(model):
  cfg, params = model
  tok = _CharTokenizer()
  items = [{"context": "abc", "choices": ["d", "ee", "f"], "answer": 1},
           {"context": "xyz", "choices": ["q", "r"], "answer": 0}]
  result = evaluate.multiple_choice(cfg, params, tok, items, k=2)
  for item, predicted in zip(items, result["predictions"]):
    scores = [_direct_logprob(cfg, params, tok.encode(item["context"]), tok.encode(c), 2) for c in item["choices"]]
    assert predicted == int(np.argmax(scores))
  expected = np.mean([p == i["answer"] for p, i in zip(result["predictions"], items)])
  assert result["acc"] == expected and result["n"] == 2


@pytest.mark.parametrize("line, message", [
    ('{"context": "a", "choices": ["x"], "answer": 0}', "at least two strings"),
    ('{"context": "a", "choices": ["x", "y"], "answer": 2}', "not an index into its 2 choices"),
    ('{"choices": ["x", "y"], "answer": 0}', 'string "context"'),
    ("[1, 2]", "expected a JSON object"),
])
def test_malformed_items_name_file_and_line(tmp_path, line, message):
  path = tmp_path / "task.jsonl"
  path.write_text(json.dumps({"context": "a", "choices": ["x", "y"], "answer": 0}) + "\n" + line + "\n")
  with pytest.raises(evaluate.TaskFormatError if "JSON object" not in message else ValueError,
                     match=rf"task\.jsonl:2: .*{message}"):
    evaluate.read_multiple_choice(str(path))
