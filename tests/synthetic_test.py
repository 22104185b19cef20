"""The synthetic task families: answers recomputed from the text, one-token choices in the vocabulary,
deterministic draws, and splits that never share a group."""

import pytest

from phds_jax.data import synthetic


def _solve(context: str) -> str:
  """Each family's answer worked out again from the words of its context."""
  words = context.split()
  family, body = words[0], words[1:-1]  # the last word is "?"
  if family == "lookup":
    pairs, query = " ".join(body).split(" ; ")
    return dict(p.split() for p in pairs.split(" , "))[query]
  if family in ("add", "sub", "mul"):
    a, b = map(int, body)
    return str({"add": a + b, "sub": a - b, "mul": a * b}[family] % 10)
  if family == "after":
    return chr((ord(body[0]) - ord("a") + int(body[1])) % 26 + ord("a"))
  if family == "pattern":
    period = next(p for p in range(1, len(body)) if all(body[i] == body[i % p] for i in range(len(body))))
    return body[len(body) % period]
  if family == "count":
    return str(body[2:].count(body[0]))
  raise AssertionError(context)


@pytest.mark.parametrize("family", list(synthetic.FAMILIES))
def test_items_are_right_and_fit_the_vocabulary(family, tmp_path):
  from phds_jax.data import pipeline

  tokenizer = pipeline.load_tokenizer(synthetic.write_tokenizer(str(tmp_path / "tok")))
  assert len(tokenizer) == len(synthetic.VOCAB) <= synthetic.VOCAB_SIZE
  items = synthetic.items(family, 200, seed=3)
  assert len(items) == 200 and len({it["group"] for it in items}) == 200
  for item in items:
    assert len(item["choices"]) == len(set(item["choices"])) == 10 and item["family"] == family
    assert item["choices"][item["answer"]] == _solve(item["context"])
    text = f"{item['context']} {item['choices'][item['answer']]}"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.unk_token_id not in ids and len(ids) == len(text.split())
    assert all(len(tokenizer.encode(c, add_special_tokens=False)) == 1 for c in item["choices"])
  assert synthetic.items(family, 200, seed=3) == items  # deterministic
  assert synthetic.items(family, 50, seed=4) != items[:50]


def test_splits_share_no_group_and_small_families_keep_half_for_training():
  for family in synthetic.FAMILIES:
    evaluation, train = synthetic.split(family, 400, 1000, seed=0)
    assert not {it["group"] for it in evaluation} & {it["group"] for it in train}
  evaluation, train = synthetic.split("arith", 400, 1000, seed=0)
  assert len(evaluation) == 150 and len(train) == 150  # 300 facts: half evaluated, half fine-tuned on
  evaluation, train = synthetic.split("lookup", 400, 1000, seed=0)
  assert (len(evaluation), len(train)) == (400, 1000)
  with pytest.raises(ValueError, match="unknown task family 'lokup'"):
    synthetic.items("lokup", 1, 0)


def test_mixtures_parse_with_named_mistakes_and_draw_in_proportion():
  assert synthetic.parse_mixture("arith:2, after:2,pattern") == {"arith": 2, "after": 2, "pattern": 1}
  for text, message in (("arith:0", "whole number >= 1"), ("arith:x", "whole number"), ("ari:2", "unknown task family"),
                        (" , ", "no task family")):
    with pytest.raises(ValueError, match=message):
      synthetic.parse_mixture(text)
  drawn = synthetic.sample_mixture({"arith": 2, "pattern": 1}, 300, seed=5)
  assert [it["family"] for it in drawn].count("arith") == 200 and len(drawn) == 300
  assert drawn == synthetic.sample_mixture({"arith": 2, "pattern": 1}, 300, seed=5)


def test_the_builtin_base_sees_every_fact_it_is_evaluated_on():
  """configs/tiny.py evaluates arith and after on their facts: its pre-training draws hold all of them."""
  from conftest import load_config

  builtin = load_config("tiny").builtin
  mixture = synthetic.parse_mixture(builtin.mixture)
  drawn = synthetic.sample_mixture(mixture, builtin.pretrain_items, seed=-1)
  for family, facts in synthetic.GROUPS_PER_FAMILY.items():
    assert family in mixture and len({it["group"] for it in drawn if it["family"] == family}) == facts
