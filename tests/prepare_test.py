"""Prepared data: batched tokenization equals the per-record reader, rows read back exactly, the prepare job
is deterministic, parallel and resumable, mismatches are refused, and runs stream it per process."""

import json
import os
import sys

import numpy as np
import pytest

from phds_jax import main
from phds_jax.cli.configs import base_config
from phds_jax.data import pipeline
from phds_jax.data import prepare
from phds_jax.data import prepared
from phds_jax.data import tokenize
from conftest import set_fields, toy_train_config, write_toy_sft, write_toy_tokenizer

CHAT = [{"role": "system", "content": "w9"}, {"role": "user", "content": "say first of : w1 w2"},
        {"role": "assistant", "content": "w1"}, {"role": "user", "content": "w4 w5"},
        {"role": "assistant", "content": "w5 w6"}]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  root = tmp_path_factory.mktemp("toy")
  return {"root": root, "tokenizer": write_toy_tokenizer(root / "tok"),
          "a": write_toy_sft(root / "a.jsonl", n=500, bad_lines=[(3, "{not json"), (7, '{"prompt": 1}')]),
          "b": write_toy_sft(root / "b.jsonl", n=160, seed=1)}


def _bpe_tokenizer(directory):
  """A small byte-level BPE (the OLMoE / Qwen kind: tokens may span spaces and newlines) with a chat template."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  backend = Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  corpus = [" ".join(m["content"] for m in CHAT) + " the quick brown fox jumps over the lazy dog\n"] * 50
  backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
  tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n"
                             "{% if m['role'] == 'assistant' %}<|endoftext|>{% endif %}{% endfor %}")
  tokenizer.save_pretrained(str(directory))
  return pipeline.load_tokenizer(str(directory))


def test_batched_tokenization_equals_the_per_record_reader(toy, tmp_path):
  """Prompt/response, conversations with and without a chat template (word-level and byte-level BPE), and
  malformed records: the same examples and the same errors as pipeline.read_sft, one call per field."""
  word = pipeline.load_tokenizer(toy["tokenizer"])
  bpe = _bpe_tokenizer(tmp_path / "bpe")
  records = [("f:1", {"prompt": "say first of : w1 w2", "response": "w1"}), ("f:2", {"messages": CHAT}),
             ("f:3", {"prompt": 1}), ("f:4", {"messages": [{"role": "user", "content": "w1"}]}),
             ("f:5", {"prompt": "w1", "response": ""}), ("f:6", {"messages": CHAT[1:3]})]
  for tokenizer in (word, bpe):
    examples, errors = tokenize.sft_examples(records, tokenizer)
    for (where, record), example in zip(records, examples):
      try:
        expected = pipeline._sft_example(record, tokenizer)
      except ValueError as e:
        assert example is None and (where, str(e)) in errors
      else:
        assert example == expected, where
    assert [w for w, _ in errors] == ["f:3", "f:4"]
  assert sum(bpe.convert_ids_to_tokens([t])[0].startswith("Ġ") for t in examples[1].tokens) > 0  # spans spaces
  (tmp_path / "t.jsonl").write_text(json.dumps({"text": "w1 w2 w3"}) + "\n")
  text, _ = tokenize.text_examples([("t:1", {"text": "w1 w2 w3"})], word)
  assert text == pipeline.read_text(str(tmp_path / "t.jsonl"), word)


def test_rows_read_back_exactly_as_packed(toy):
  tokenizer = pipeline.load_tokenizer(toy["tokenizer"])
  examples = pipeline.read_sft(toy["b"], tokenizer)
  for window in (None, 4):
    groups = list(pipeline.pack_groups(examples, 40, max_loss_tokens=6, window=window))
    assert sum(len(g) for g in groups) == len(examples)
    for group in groups:
      got, want = prepared.decode_row(prepared.encode_row(group), 40), pipeline._row(group, 40)
      assert all(np.array_equal(got[key], want[key]) and got[key].dtype == want[key].dtype for key in want)
  assert [pipeline._row(g, 40)["inputs"].tolist() for g in pipeline.pack_groups(examples, 40, max_loss_tokens=6)] == \
      [r["inputs"].tolist() for r in pipeline.pack(examples, 40, max_loss_tokens=6)]


def _prepare_config(toy, out, **changes):
  c = base_config()
  c.mode = "prepare"
  return set_fields(c, **{"tokenizer_path": toy["tokenizer"], "data.train_files": f"{toy['a']},{toy['b']}",
                          "data.prepared": str(out), "data.seq_len": 48, "data.max_loss_tokens": 8,
                          "data.workers": 1, **changes})


def _contents(directory):
  return {os.path.relpath(os.path.join(root, name), directory): open(os.path.join(root, name), "rb").read()
          for root, _, names in os.walk(directory) for name in names}


def test_prepare_is_deterministic_parallel_and_resumes_where_it_stopped(toy, tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(prepare, "CHUNK_RECORDS", 64)  # several chunks per source
  main.run(_prepare_config(toy, tmp_path / "one"))
  one = _contents(tmp_path / "one")
  assert sum(name.startswith("train/") for name in one) == 8 + 3 and "manifest.json" in one
  main.run(_prepare_config(toy, tmp_path / "two", **{"data.workers": 2}))
  assert _contents(tmp_path / "two") == one  # two worker processes: the same bytes
  # killed after three chunks (a half-written shard left behind): a re-run finishes it, the same bytes again
  original, done = prepare.prepare_chunk, []

  def dies_at_the_fourth(directory, settings, source, kind, chunk, records):
    if len(done) == 3:
      open(os.path.join(directory, "train", prepare.shard_name(source, chunk) + ".array_record.tmp"), "wb").write(b"x")
      raise KeyboardInterrupt
    done.append(chunk)
    return original(directory, settings, source, kind, chunk, records)

  monkeypatch.setattr(prepare, "prepare_chunk", dies_at_the_fourth)
  with pytest.raises(KeyboardInterrupt):
    main.run(_prepare_config(toy, tmp_path / "killed"))
  assert not os.path.exists(tmp_path / "killed" / "manifest.json")
  monkeypatch.setattr(prepare, "prepare_chunk", original)
  capsys.readouterr()
  main.run(_prepare_config(toy, tmp_path / "killed"))
  out = capsys.readouterr().out
  assert "resuming" in out and "(192 prepared before)" in out
  assert {k: v for k, v in _contents(tmp_path / "killed").items() if not k.endswith(".tmp")} == one
  main.run(_prepare_config(toy, tmp_path / "killed"))
  assert "already prepared" in capsys.readouterr().out
  with pytest.raises(pipeline.DataError, match=r"prepared from other inputs or settings \(seq_len differ\)"):
    main.run(_prepare_config(toy, tmp_path / "killed", **{"data.seq_len": 40}))
  manifest = json.loads(one["manifest.json"])
  assert manifest["malformed"] == 2 and manifest["malformed_first"][0].startswith(f"{toy['a']}:4: ")
  assert manifest["malformed_first"][1].startswith(f"{toy['a']}:8: expected string fields")
  a, b = manifest["sources"]
  assert a["records"] == 502 and b["records"] == 160 and a["val_rows"] + b["val_rows"] > 0
  assert manifest["tokenizer"] == prepared.tokenizer_identity(toy["tokenizer"])
  with pytest.raises(pipeline.DataError, match=r"a\.jsonl:4: "):
    main.run(_prepare_config(toy, tmp_path / "strict", **{"data.on_error": "raise"}))


@pytest.fixture(scope="module")
def ready(toy, tmp_path_factory):
  out = tmp_path_factory.mktemp("prepared") / "data"
  main.run(_prepare_config(toy, out))
  return str(out)


def test_a_dataset_prepared_differently_is_refused_in_one_message(toy, ready, tmp_path):
  tokenizer = pipeline.load_tokenizer(toy["tokenizer"])
  manifest = prepared.read_manifest(ready)
  other = tmp_path / "tok"
  tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
  tokenizer.save_pretrained(str(other))
  run = prepared.Expected(prepared.tokenizer_identity(str(other)), 64, tokenizer.chat_template, "sft", 4)
  with pytest.raises(pipeline.DataError) as refused:
    prepared.check(manifest, run, ready)
  lines = str(refused.value).splitlines()
  assert [line.split(":")[0].strip("- ") for line in lines[1:]] == [
      "tokenizer", "data.seq_len", "chat template", "data.max_loss_tokens"]
  assert "prepared 48, the run's 64" in str(refused.value)
  same = prepared.Expected(manifest["tokenizer"], 48, None, "sft", 8)
  assert prepared.differences(manifest, same) == []


def test_runs_stream_their_share_and_resume_on_another_process_count(ready):
  manifest = prepared.read_manifest(ready)
  (rows,) = prepared.train_sources(ready, manifest, mixture=False)
  assert len(rows) == sum(s["train_rows"] for s in manifest["sources"])
  whole = pipeline.train_batches(rows, 4, seed=3, read_threads=2)  # as the trainer reads it: threads ahead
  first = [next(whole)["inputs"] for _ in range(3)]
  state = whole.get_state()
  assert state == {"next_index": 3}  # what was taken, not what the threads read ahead
  later = [next(whole)["inputs"] for _ in range(2)]
  halves = [pipeline.train_batches(rows, 4, seed=3, process_index=p, process_count=2) for p in (0, 1)]
  for half in halves:
    half.set_state(state)  # a one-process checkpoint resumed on two processes
  for batch in later:
    assert np.array_equal(np.concatenate([next(h)["inputs"] for h in halves]), batch)
  again = pipeline.train_batches(rows, 4, seed=3)
  assert all(np.array_equal(next(again)["inputs"], b) for b in first)
  # a 3:1 mixture of the two sources draws rows in that proportion
  sources = prepared.train_sources(ready, manifest, mixture=True)
  tagged = [s.map(lambda r, i=i: dict(r, inputs=np.full_like(r["inputs"], i))) for i, s in enumerate(sources)]
  mixed = pipeline.train_batches(tagged, 8, seed=0, weights=[3, 1])
  drawn = np.concatenate([next(mixed)["inputs"][:, 0] for _ in range(50)])
  assert abs(np.mean(drawn == 0) - 0.75) < 0.01


def test_training_and_evaluation_read_the_prepared_data(toy, ready, tmp_path, capsys):
  from phds_jax.eval import job

  config = toy_train_config(tmp_path, **{"data.train_files": "", "data.prepared": ready, "data.mixture": "3,1",
                                         "data.max_loss_tokens": 8, "data.seq_len": 48, "train.steps": 4,
                                         "eval.every": 4, "checkpoint.every": 4, "eval.max_rows": 3})
  summary = main.run(config, str(tmp_path / "w"))
  out = capsys.readouterr().out
  assert f"data: prepared {ready}" in out and "75.0% of the rows drawn" in out
  assert "validation 3 rows (the first of" in out  # eval.max_rows caps the rows of every evaluation
  assert [h["step"] for h in summary["history"]] == [0, 4]
  with pytest.raises(Exception, match="data.seq_len: prepared 48, the run's 64"):
    main.run(set_fields(config, **{"data.seq_len": 64}), str(tmp_path / "w2"))
  tokenizer = pipeline.load_tokenizer(toy["tokenizer"])
  eval_config = set_fields(base_config(), **{"data.prepared": ready, "data.seq_len": 48, "eval.batch_size": 2,
                                             "eval.max_rows": 3})
  batches = job._text_batches(eval_config, tokenizer, toy["tokenizer"])
  assert len(batches) == 2 and [b["weights"].shape for b in batches] == [(2, 48)] * 2


def test_mistakes_are_named_before_any_work(toy, ready, tmp_path):
  from phds_jax.cli import modes

  config = toy_train_config(tmp_path, **{"data.prepared": ready, "data.mixture": "3,x"})
  problems = modes.problems(config)
  assert any("data.train_files would not be read" in p for p in problems)
  assert any("data.mixture='3,x'" in p for p in problems)
  mixed = toy_train_config(tmp_path, **{"data.mixture": "1,2"})
  assert any("2 weights for 1 data.train_files sources" in p for p in modes.problems(mixed))
  assert modes.problems(_prepare_config(toy, "")) == [
      "data.prepared: required; the directory (local, relative or gs://) to write to"]
  with pytest.raises(pipeline.DataError, match=r"hf:nobody/nothing: not in the Hugging Face datasets cache.*"
                                               r"load_dataset\('nobody/nothing', split='train'\)"):
    list(pipeline.read_records("hf:nobody/nothing", pipeline.ReadStats(), "skip"))


def test_a_missing_datasets_package_is_named(monkeypatch):
  monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets raises ImportError
  with pytest.raises(pipeline.DataError, match=r'hf:a/b: reading Hugging Face datasets needs the datasets package: '
                                               r'pip install -e "\.\[datasets\]"'):
    list(pipeline.read_records("hf:a/b", pipeline.ReadStats(), "skip"))


def test_hub_sources_read_the_datasets_cache_like_jsonl(toy, tmp_path, monkeypatch):
  """hf:NAME goes through datasets.load_dataset offline (here NAME is a local dataset directory, which it
  loads the way it loads a cached hub dataset): the same examples as the JSONL file."""
  import datasets

  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
  for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
    monkeypatch.setenv(name, "0")  # restored after the test: the reader sets them
  (tmp_path / "hub").mkdir()
  (tmp_path / "hub" / "train.jsonl").write_text(open(toy["b"]).read())
  tokenizer = pipeline.load_tokenizer(toy["tokenizer"])
  assert pipeline.read_sft(f"hf:{tmp_path / 'hub'}", tokenizer) == pipeline.read_sft(toy["b"], tokenizer)


def test_text_documents_are_prepared_like_the_in_memory_reader(toy, tmp_path):
  """data.format=text: a .txt file's blank-line-separated documents, cut into row-sized pieces: every token
  after each document's first is trained on once, as pipeline.read_text + chunk_examples + pack give."""
  words = [f"w{i}" for i in range(30)]
  docs = [" ".join(words[i:i + n]) for i, n in ((0, 25), (3, 4), (5, 12))]
  (tmp_path / "lm.txt").write_text("\n\n".join(docs) + "\n")
  main.run(_prepare_config(toy, tmp_path / "out", **{"data.format": "text", "data.train_files": str(tmp_path / "lm.txt"),
                                                     "data.max_loss_tokens": 0, "data.seq_len": 8,
                                                     "data.val_fraction": 0.0}))
  manifest = prepared.read_manifest(str(tmp_path / "out"))
  (rows,) = prepared.train_sources(str(tmp_path / "out"), manifest, mixture=False)
  tokenizer = pipeline.load_tokenizer(toy["tokenizer"])
  memory = pipeline.pack(pipeline.chunk_examples(pipeline.read_text(str(tmp_path / "lm.txt"), tokenizer), 8), 8)
  trained = lambda rs: sorted(int(t) for r in rs for t, w in zip(r["targets"], r["weights"]) if w)
  assert trained([rows[i] for i in range(len(rows))]) == trained(memory)
  assert manifest["sources"][0]["records"] == 3 and manifest["sources"][0]["train_trained_tokens"] == 25 + 4 + 12


def test_validation_batches_are_split_over_processes_like_training_batches():
  """Each process reads and yields its share of every global validation batch (padded with weight-0 rows);
  the shares side by side are the one-process batches, which equal pipeline.eval_batches."""
  rows = [{key: np.full(4, i + 1, np.float32 if key == "weights" else np.int32) for key in pipeline.ROW_KEYS}
          for i in range(7)]

  class Counting(list):
    reads = 0

    def __getitem__(self, index):
      Counting.reads += 1
      return super().__getitem__(index)

  whole = list(pipeline.Batches(rows, 4))
  assert all(np.array_equal(a[k], b[k]) for a, b in zip(whole, pipeline.eval_batches(rows, 4)) for k in a)
  shares = [list(pipeline.Batches(Counting(rows), 4, process_index=p, process_count=2)) for p in (0, 1)]
  for batch, first, second in zip(whole, *shares):
    assert all(np.array_equal(np.concatenate([first[k], second[k]]), batch[k]) for k in batch)
  assert Counting.reads == 7  # every row read once in all, by the process that scores it
  assert [b["weights"][:, 0].tolist() for b in shares[1]] == [[3, 4], [7, 0]]
  with pytest.raises(pipeline.DataError, match="eval.batch_size=4 validation rows do not split over 3 processes"):
    pipeline.Batches(rows, 4, process_count=3)
  from phds_jax.model import sharding

  config = set_fields(base_config(), **{"eval.batch_size": 6, "mesh.fsdp": -1, "mesh.data": 1})
  assert sharding.mesh_and_batch_problems(config, devices=4, slices=1, processes=2) == [
      "eval.batch_size=6 validation rows do not divide over the 4 data-parallel devices and 2 process(es) (each "
      "process reads its share of every validation batch); pass a multiple"]
