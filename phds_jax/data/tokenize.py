"""Batched tokenization of SFT and LM records: the prepare job's inner loop (phds_jax/data/prepare.py).

Each function takes a chunk of (where, record) and returns (examples, errors): the same Example (tokens and
loss mask) pipeline.read_sft / read_text build for each record, but with one call of the fast tokenizer's
backend per field over the whole chunk instead of one per record. errors: (where, reason) of each record
that could not be used, in order.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from phds_jax.data.pipeline import Example, adds_bos, turn_text

Errors = list[tuple[str, str]]


def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
  """tokenizer.encode(text, add_special_tokens=False) for every text, in one batched backend call."""
  backend = getattr(tokenizer, "_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
  if backend is None:
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]
  batch = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast: no character offsets
  return [e.ids for e in batch(list(texts), add_special_tokens=False)]


def sft_examples(records: Sequence[tuple[str, dict]], tokenizer) -> tuple[list[Optional[Example]], Errors]:
  """One Example (None for a bad record) per record: {"prompt", "response"} (loss on the response and EOS)
  or {"messages": [...]} (loss on assistant turns), as pipeline._sft_example."""
  errors: list[tuple[int, str]] = []  # (record index, reason)
  plain, chats = [], []
  for i, (_, record) in enumerate(records):
    if "messages" in record:
      problem = _messages_problem(record["messages"])
      chats.append(i) if problem is None else errors.append((i, problem))
    elif isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
      plain.append(i)
    else:
      errors.append((i, 'expected string fields "prompt" and "response" (or a "messages" list)'))
  out: list[Optional[Example]] = [None] * len(records)
  prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and adds_bos(tokenizer) else []
  eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
  prompts = encode(tokenizer, [records[i][1]["prompt"] for i in plain])
  responses = encode(tokenizer, [records[i][1]["response"] for i in plain])
  for i, p, r in zip(plain, prompts, responses):
    if not r + eos:
      errors.append((i, "empty response"))
      continue
    out[i] = Example(prefix + p + r + eos, [False] * (len(prefix) + len(p)) + [True] * (len(r) + len(eos)))
  examples = (_templated if getattr(tokenizer, "chat_template", None) else _turns)(
      [records[i][1]["messages"] for i in chats], tokenizer)
  for i, example in zip(chats, examples):
    if isinstance(example, str):
      errors.append((i, example))
    else:
      out[i] = example
  return out, [(records[i][0], reason) for i, reason in sorted(errors)]


def _messages_problem(messages: Any) -> Optional[str]:
  if not isinstance(messages, list) or not messages or not all(
      isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
      for m in messages):
    return '"messages" must be a non-empty list of {"role": str, "content": str}'
  if not any(m["role"] == "assistant" for m in messages):
    return '"messages" has no assistant turn to train on'
  return None


def _turns(conversations: list[list[dict]], tokenizer) -> list[Example]:
  """Without a chat template: "<|role|>\\ncontent\\n" per turn, EOS after assistant turns (pipeline._render_chat)."""
  pieces = encode(tokenizer, [turn_text(m) for messages in conversations for m in messages])
  eos = tokenizer.eos_token_id
  out, at = [], 0
  for messages in conversations:
    tokens, mask = [], []
    for m in messages:
      ids = pieces[at] + ([eos] if m["role"] == "assistant" and eos is not None else [])
      at += 1
      tokens += ids
      mask += [m["role"] == "assistant"] * len(ids)
    out.append(Example(tokens, mask))
  return out


def _templated(conversations: list[list[dict]], tokenizer) -> list[Example | str]:
  """With the tokenizer's chat template: each prefix of a conversation rendered as text, the whole
  conversation tokenized once; a token belongs to the turn whose rendered prefix first covers its end
  (what tokenizing every prefix gives when the template renders prefixes consistently; a conversation whose
  renders are not prefixes of each other is an error, as in pipeline._chat_example)."""
  renders, bad = [], {}
  for c, messages in enumerate(conversations):
    texts = [tokenizer.apply_chat_template(messages[: i + 1], tokenize=False) for i in range(len(messages))]
    if any(not later.startswith(earlier) for earlier, later in zip(texts, texts[1:])):
      bad[c] = "the chat template does not render conversations prefix-consistently"
    renders.append(texts)
  backend = tokenizer._tokenizer  # pylint: disable=protected-access  (offsets need the backend's encodings)
  encodings = backend.encode_batch([texts[-1] for texts in renders], add_special_tokens=False)
  out: list[Example | str] = []
  for c, (messages, texts, encoding) in enumerate(zip(conversations, renders, encodings)):
    if c in bad:
      out.append(bad[c])
      continue
    ends = [len(t) for t in texts]
    mask, turn = [], 0
    for _, end in encoding.offsets:
      while turn < len(ends) - 1 and end > ends[turn]:
        turn += 1
      mask.append(messages[turn]["role"] == "assistant")
    out.append(Example(list(encoding.ids), mask))
  return out


def text_examples(records: Sequence[tuple[str, dict]], tokenizer) -> tuple[list[Optional[Example]], Errors]:
  """LM examples (loss on every token, EOS appended) of {"text": str} records, as pipeline.read_text."""
  errors: Errors = []
  good = []
  for i, (where, record) in enumerate(records):
    if isinstance(record.get("text"), str) and record["text"].strip():
      good.append(i)
    else:
      errors.append((where, 'expected a non-empty string field "text"'))
  out: list[Optional[Example]] = [None] * len(records)
  eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
  for i, ids in zip(good, encode(tokenizer, [records[i][1]["text"] for i in good])):
    out[i] = Example(ids + eos, [True] * (len(ids) + len(eos)))
  return out, errors
