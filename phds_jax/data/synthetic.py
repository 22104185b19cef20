"""Synthetic task families a ~10M-parameter MoE learns on 2 CPU cores: the tiny study's and the built-in
run's data. Every item is a multiple-choice question with 10 one-token choices (chance 0.10), written in a
64-token word-level vocabulary (`write_tokenizer`), e.g.

  lookup  "lookup a 3 , k 7 , q 1 ; q ?"  -> "1"   (recall a value bound in the context: attention)
  arith   "add 7 5 ?"                     -> "2"   (add / sub / mul mod 10: 300 facts to store)
  after   "after g 3 ?"                   -> "j"   (the letter n places on, mod 26: 260 facts to store)
  pattern "pattern a b c a b c a ?"       -> "b"   (continue a periodic sequence)
  count   "count b in b a b c b ?"        -> "3"   (how often a letter occurs)

Each family starts with its own keyword, so the router can tell the families apart (experts specialise:
measured in the study). An item's "group" is what must not be shared between a fine-tuning set and an
evaluation set: the fact (arith, after) or the whole context (the others, practically never repeated).
"""

from __future__ import annotations

import os
import random
from typing import Any, Callable

Item = dict[str, Any]

DIGITS = [str(d) for d in range(10)]
LETTERS = [chr(ord("a") + i) for i in range(26)]
KEYWORDS = ["lookup", "add", "sub", "mul", "after", "pattern", "count", "in", ",", ";", "?"]
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
VOCAB = SPECIALS + DIGITS + LETTERS + KEYWORDS  # 51 tokens; models round the vocabulary up to 64
VOCAB_SIZE = 64
_OPS: dict[str, Callable[[int, int], int]] = {"add": lambda a, b: (a + b) % 10, "sub": lambda a, b: (a - b) % 10,
                                              "mul": lambda a, b: (a * b) % 10}


def _item(context: str, choices: list[str], answer: str, family: str, group: str) -> Item:
  return {"context": context, "choices": choices, "answer": choices.index(answer), "family": family,
          "group": group}


def _letter_choices(rng: random.Random, must: list[str]) -> list[str]:
  """10 letters in alphabetical order: `must` and random others."""
  others = [c for c in LETTERS if c not in must]
  return sorted(must + rng.sample(others, 10 - len(must)))


def lookup(rng: random.Random) -> Item:
  keys = rng.sample(LETTERS, rng.randint(3, 6))
  values = [rng.choice(DIGITS) for _ in keys]
  query = rng.randrange(len(keys))
  context = "lookup " + " , ".join(f"{k} {v}" for k, v in zip(keys, values)) + f" ; {keys[query]} ?"
  return _item(context, DIGITS, values[query], "lookup", context)


def arith(rng: random.Random) -> Item:
  op, a, b = rng.choice(sorted(_OPS)), rng.randrange(10), rng.randrange(10)
  context = f"{op} {a} {b} ?"
  return _item(context, DIGITS, str(_OPS[op](a, b)), "arith", context)


def after(rng: random.Random) -> Item:
  start, steps = rng.randrange(26), rng.randrange(10)
  choices = [LETTERS[(start + n) % 26] for n in range(10)]  # the letters 0..9 places on
  context = f"after {LETTERS[start]} {steps} ?"
  return _item(context, choices, choices[steps], "after", context)


def pattern(rng: random.Random) -> Item:
  unit = rng.sample(LETTERS, rng.randint(2, 4))
  length = rng.randint(2 * len(unit) + 1, 10)
  sequence = [unit[i % len(unit)] for i in range(length + 1)]
  context = "pattern " + " ".join(sequence[:-1]) + " ?"
  return _item(context, _letter_choices(rng, unit), sequence[-1], "pattern", context)


def count(rng: random.Random) -> Item:
  alphabet = rng.sample(LETTERS, rng.randint(2, 4))
  sequence = [rng.choice(alphabet) for _ in range(rng.randint(3, 9))]
  target = rng.choice(alphabet)
  context = f"count {target} in " + " ".join(sequence) + " ?"
  return _item(context, DIGITS, str(sequence.count(target)), "count", context)


FAMILIES: dict[str, Callable[[random.Random], Item]] = {
    "lookup": lookup, "arith": arith, "after": after, "pattern": pattern, "count": count}
GROUPS_PER_FAMILY = {"arith": 300, "after": 260}  # families with few distinct items; the others: ~unbounded


def _draw(family: str) -> Callable[[random.Random], Item]:
  if family not in FAMILIES:
    raise ValueError(f"unknown task family {family!r}; the families are {list(FAMILIES)}")
  return FAMILIES[family]


def items(family: str, n: int, seed: int, exclude_groups: frozenset[str] | set[str] = frozenset()) -> list[Item]:
  """`n` items of `family` with distinct groups, none in `exclude_groups`, drawn with `seed`; fewer when the
  family has fewer groups left. Deterministic: the same arguments give the same items in the same order."""
  draw = _draw(family)
  rng, out, seen = random.Random(f"{family}/{seed}"), [], set(exclude_groups)
  limit = GROUPS_PER_FAMILY.get(family)
  misses = 0
  while len(out) < n and misses < 10_000 and (limit is None or len(seen) < limit):
    item = draw(rng)
    if item["group"] in seen:
      misses += 1
      continue
    seen.add(item["group"])
    out.append(item)
  return out


def sample(family: str, n: int, seed: int) -> list[Item]:
  """`n` items of `family` drawn independently with `seed` (groups may repeat): pre-training data."""
  draw = _draw(family)
  rng = random.Random(f"sample/{family}/{seed}")
  return [draw(rng) for _ in range(n)]


def parse_mixture(text: str) -> dict[str, int]:
  """"arith:2,after:2,pattern:1" -> {"arith": 2, "after": 2, "pattern": 1} (a family without ":w" weighs 1).
  Raises ValueError naming the first unknown family or bad weight."""
  mixture = {}
  for part in (p.strip() for p in text.split(",") if p.strip()):
    family, _, weight = part.partition(":")
    _draw(family)
    if not weight.strip().isdigit() or int(weight) < 1:
      if weight:
        raise ValueError(f"{part!r}: the weight after ':' must be a whole number >= 1")
      weight = "1"
    mixture[family] = int(weight)
  if not mixture:
    raise ValueError("no task family named")
  return mixture


def sample_mixture(mixture: dict[str, int], n: int, seed: int) -> list[Item]:
  """About `n` items drawn with `seed` from the families of `mixture` in proportion to their weights,
  shuffled together (groups may repeat)."""
  per_weight = n // sum(mixture.values())
  drawn = [it for family, weight in mixture.items() for it in sample(family, weight * per_weight, seed)]
  random.Random(0).shuffle(drawn)  # one shuffle for every seed: the study's cached base was drawn so
  return drawn


def split(family: str, n_eval: int, n_train: int, seed: int) -> tuple[list[Item], list[Item]]:
  """(evaluation, fine-tuning) items of `family` for `seed`, no group in both. For the families with few
  facts (arith, after) the evaluation takes at most half of them."""
  limit = GROUPS_PER_FAMILY.get(family)
  evaluation = items(family, n_eval if limit is None else min(n_eval, limit // 2), seed)
  train = items(family, n_train, seed + 10_000, exclude_groups={it["group"] for it in evaluation})
  return evaluation, train


def as_sft(item: Item) -> dict[str, str]:
  return {"prompt": item["context"], "response": item["choices"][item["answer"]]}


def as_multiple_choice(item: Item) -> dict[str, Any]:
  return {key: item[key] for key in ("context", "choices", "answer", "family")}


def write_tokenizer(directory: str, vocabulary=VOCAB) -> str:
  """A word-level tokenizer (a transformers PreTrainedTokenizerFast splitting at whitespace; ids in the
  order of `vocabulary`, whose first four are <pad>, <bos>, <eos>, <unk>) in `directory`, unless one is
  there already; returns the directory."""
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top

  if os.path.isfile(os.path.join(directory, "tokenizer.json")):
    return directory
  tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocabulary)}, unk_token="<unk>"))
  tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>",
                                 eos_token="<eos>", unk_token="<unk>")
  fast.save_pretrained(directory)
  return directory
