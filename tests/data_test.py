"""Data pipeline: SFT/LM reading, loss masks, packing, malformed lines, splits, grain iteration."""

import json

import numpy as np
import pytest

from phds_jax.data import pipeline as data
from conftest import write_toy_sft, write_toy_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return data.load_tokenizer(write_toy_tokenizer(tmp_path_factory.mktemp("tok")))


def test_sft_loss_is_on_the_response_only(tokenizer, tmp_path):
  path = tmp_path / "a.jsonl"
  path.write_text(json.dumps({"prompt": "say first of : w1 w2", "response": "w1"}) + "\n")
  (ex,) = data.read_sft(str(path), tokenizer)
  words = tokenizer.convert_ids_to_tokens(ex.tokens)
  assert words == ["say", "first", "of", ":", "w1", "w2", "w1", "<eos>"]
  assert ex.loss_mask == [False] * 6 + [True, True]


def test_chat_messages_mask_assistant_turns(tokenizer, tmp_path):
  path = tmp_path / "chat.jsonl"
  messages = [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"},
              {"role": "user", "content": "w4"}, {"role": "assistant", "content": "w5 w6"}]
  path.write_text(json.dumps({"messages": messages}) + "\n")
  (ex,) = data.read_sft(str(path), tokenizer)
  trained = [t for t, m in zip(tokenizer.convert_ids_to_tokens(ex.tokens), ex.loss_mask) if m]
  assert "w3" in trained and "w5" in trained and "w6" in trained
  assert not {"w1", "w2", "w4"} & set(trained)


def test_chat_template_is_used_when_present(tokenizer, tmp_path):
  tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
  try:
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "w1"},
                                             {"role": "assistant", "content": "w2"}]}) + "\n")
    (ex,) = data.read_sft(str(path), tokenizer)
    assert tokenizer.convert_ids_to_tokens(ex.tokens) == ["<unk>", ":", "w1", "<unk>", ":", "w2"]
    assert ex.loss_mask == [False, False, False, True, True, True]
  finally:
    tokenizer.chat_template = None


def test_malformed_lines_are_skipped_and_counted_or_fatal(tokenizer, tmp_path):
  path = write_toy_sft(tmp_path / "d.jsonl", n=20, bad_lines=[(3, "{not json"), (7, '{"prompt": 1}')])
  stats = data.ReadStats()
  examples = data.read_sft(path, tokenizer, stats=stats)
  assert len(examples) == 20 and stats.skipped == 2
  with pytest.raises(data.DataError, match=r"d\.jsonl:4: "):
    data.read_sft(path, tokenizer, on_error="raise")


def test_empty_dataset_and_missing_files_are_clear_errors(tokenizer, tmp_path):
  (tmp_path / "empty.jsonl").write_text("\n")
  with pytest.raises(data.DataError, match="no usable SFT examples"):
    data.read_sft(str(tmp_path / "empty.jsonl"), tokenizer)
  with pytest.raises(data.DataError, match="no file matches"):
    data.read_sft(str(tmp_path / "nope*.jsonl"), tokenizer)


def test_packing_builds_segments_positions_and_shifted_targets():
  a = data.Example([1, 2, 3, 4], [False, False, True, True])
  b = data.Example([5, 6, 7], [False, True, True])
  (row,) = data.pack([a, b], seq_len=8)
  np.testing.assert_array_equal(row["inputs"], [1, 2, 3, 5, 6, 0, 0, 0])
  np.testing.assert_array_equal(row["targets"], [2, 3, 4, 6, 7, 0, 0, 0])
  np.testing.assert_array_equal(row["weights"], [0, 1, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 2, 2, 0, 0, 0])
  np.testing.assert_array_equal(row["positions"], [0, 1, 2, 0, 1, 0, 0, 0])


def test_packing_respects_capacity_and_loss_cap():
  examples = [data.Example(list(range(1, 6)), [False, False, True, True, True]) for _ in range(6)]
  rows = data.pack(examples, seq_len=8, max_loss_tokens=3)  # 4 positions and 3 trained tokens each
  assert len(rows) == 6  # the loss cap, not the length, allows one example per row
  rows = data.pack(examples, seq_len=8)
  assert len(rows) == 3
  for row in rows:
    assert row["weights"].sum() <= 8
  with pytest.raises(data.DataError, match="more than max_loss_tokens=2"):
    data.pack(examples, seq_len=8, max_loss_tokens=2)


def test_long_examples_are_truncated_and_counted():
  stats = data.ReadStats()
  (row,) = data.pack([data.Example(list(range(1, 20)), [True] * 19)], seq_len=8, stats=stats)
  assert stats.truncated == 1 and row["segment_ids"].min() == 1


def test_text_chunks_cover_every_token(tokenizer, tmp_path):
  path = tmp_path / "t.txt"
  path.write_text(" ".join(f"w{i % 40}" for i in range(50)) + "\n\n" + "w1 w2 w3\n")
  examples = data.chunk_examples(data.read_text(str(path), tokenizer), 16)
  assert sum(len(e.tokens) - 1 for e in examples) == (51 - 1) + (4 - 1)  # every next-token target once
  assert max(len(e.tokens) for e in examples) == 17


def test_validation_split_is_deterministic_and_disjoint(tokenizer, tmp_path):
  examples = data.read_sft(write_toy_sft(tmp_path / "s.jsonl", n=100), tokenizer)
  train, val = data.split_validation(examples, 0.2, seed=3)
  train2, val2 = data.split_validation(examples, 0.2, seed=3)
  assert len(val) == 20 and len(train) == 80
  assert [e.tokens for e in val] == [e.tokens for e in val2]
  assert not {id(e) for e in train} & {id(e) for e in val}


def test_train_batches_are_seeded_resumable_and_split_over_processes():
  rows = [{key: np.full(4, i, np.int32 if key != "weights" else np.float32) for key in data.ROW_KEYS}
          for i in range(12)]
  it = data.train_batches(rows, 3, seed=1)
  first = [next(it)["inputs"][:, 0].tolist() for _ in range(3)]
  state = it.get_state()
  after = [next(it)["inputs"][:, 0].tolist() for _ in range(5)]
  it.set_state(state)
  assert [next(it)["inputs"][:, 0].tolist() for _ in range(5)] == after
  again = data.train_batches(rows, 3, seed=1)
  assert [next(again)["inputs"][:, 0].tolist() for _ in range(3)] == first
  # two processes: each gets half of every global batch, disjoint, together the one-process stream, and
  # reads only the rows it keeps
  class CountingRows(list):
    reads = 0

    def __getitem__(self, index):
      CountingRows.reads += 1
      return super().__getitem__(index)

  hosts = [data.train_batches(CountingRows(rows), 4, seed=1, process_index=i, process_count=2) for i in range(2)]
  whole = data.train_batches(rows, 4, seed=1)
  for _ in range(4):
    halves = [next(h)["inputs"][:, 0].tolist() for h in hosts]
    assert len(halves[0]) == 2 and halves[0] + halves[1] == next(whole)["inputs"][:, 0].tolist()
  assert CountingRows.reads == 4 * 4  # 4 steps x (2 + 2) rows, not 4 x (4 + 4)
  with pytest.raises(data.DataError, match="cannot fill one batch"):
    data.train_batches(rows[:2], 3, seed=0)


def test_eval_batches_pad_with_empty_rows():
  rows = [{key: np.ones(4, np.float32 if key == "weights" else np.int32) for key in data.ROW_KEYS}] * 5
  batches = data.eval_batches(rows, 4)
  assert len(batches) == 2 and batches[1]["weights"].sum() == 4


def test_sft_reads_parquet_and_saved_datasets_like_jsonl(tmp_path):
  """The same records as JSONL, parquet and a `datasets.save_to_disk` directory give the same examples; a
  malformed record is named by file and row."""
  import datasets
  import pyarrow as pa
  import pyarrow.parquet as pq

  from conftest import write_toy_tokenizer
  from phds_jax.data import pipeline

  tokenizer = pipeline.load_tokenizer(write_toy_tokenizer(tmp_path / "tok"))
  records = [{"prompt": "say w1", "response": "w2 w3"}, {"messages": [{"role": "user", "content": "w4"},
                                                                       {"role": "assistant", "content": "w5"}]}]
  (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  flat = [{"prompt": "say w1", "response": "w2 w3"}, {"prompt": "w6", "response": "w7"}]
  (tmp_path / "flat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in flat))
  datasets.Dataset.from_list(flat).save_to_disk(str(tmp_path / "saved"))
  # one table holding both kinds: each row's other columns are null, and read as absent
  pq.write_table(pa.table({"prompt": [records[0]["prompt"], None], "response": [records[0]["response"], None],
                           "messages": [None, records[1]["messages"]]}), tmp_path / "mixed.parquet")
  assert pipeline.read_sft(str(tmp_path / "mixed.parquet"), tokenizer) == pipeline.read_sft(
      str(tmp_path / "a.jsonl"), tokenizer)
  assert pipeline.read_sft(str(tmp_path / "saved"), tokenizer) == pipeline.read_sft(
      str(tmp_path / "flat.jsonl"), tokenizer)
  pq.write_table(pa.Table.from_pylist([{"prompt": "w1", "response": None}]), tmp_path / "bad.parquet")
  with pytest.raises(pipeline.DataError, match=r"bad.parquet:row 1: expected string fields"):
    pipeline.read_sft(str(tmp_path / "bad.parquet"), tokenizer, on_error="raise")
