"""Shared fixtures: tiny random transformers MoE models (the PyTorch reference) saved as HF directories.

Compilation dominates this suite (a tiny 4-layer model compiles in ~1 s, runs in ~5 ms), so:
- the tests compile with XLA's cheap CPU back-end settings (same HLO, same numerics checks): LLVM
  optimisation off and the legacy elemental emitters (a forward compiles in about half the time; it runs
  ~3x slower, which only the few tests with a 50k vocabulary feel);
- on CPU, expert_backend="auto" means "ragged" ($PHDS_JAX_EXPERT_BACKEND): its dense fallback compiles in
  a third of the time of the chunked backend's loops (0.31 vs 1.09 s for a tiny 4-layer forward). The
  chunked backend (what "auto" means on CPU and GPU elsewhere) is tested by name: against the reference
  in tests/experts_test.py and tests/transformer_test.py, scanned, with remat and on a mesh in
  tests/scan_test.py, expert-parallel in tests/expert_parallel_test.py;
- one persistent compilation cache per test session, shared with the pytest-xdist workers and the
  subprocesses the tests start: identical programs built by different Trainer or jit instances compile
  once. It lives in a fresh temporary directory, so every run starts cold, as CI does.
- temporary files (pytest's tmp_path, the cache) in RAM (/dev/shm) where it has room: no I/O waits;
- tests sharing a module-scoped fixture run on one pytest-xdist worker (`pytest_collection_modifyitems`).
All of it is set in the environment before JAX is imported, so subprocesses inherit it.
"""

import atexit
import os
import shutil
import sys
import tempfile


def _use_ram_for_temporary_files(root="/dev/shm", need=4 * 2**30):
  """TMPDIR in RAM where there is room (containers often give /dev/shm 64 MB): the suite writes ~0.5 GB
  (checkpoints, exports, the compilation cache) and orbax syncs each checkpoint, which on a busy virtual
  disk waits on I/O (the suite took 237 s instead of 261-289 s). pytest's tmp_path, tempfile and the
  tests' subprocesses all follow TMPDIR; the directory is removed when the run ends."""
  if "PYTEST_XDIST_WORKER" in os.environ or not os.path.isdir(root) or not os.access(root, os.W_OK):
    return  # the workers inherit the controller's choice
  stat = os.statvfs(root)
  if stat.f_bavail * stat.f_frsize >= need:
    os.environ["TMPDIR"] = tempfile.mkdtemp(prefix="phds_jax_tests_", dir=root)  # all of it gone at exit
    atexit.register(shutil.rmtree, os.environ["TMPDIR"], ignore_errors=True)
    tempfile.tempdir = None  # computed again from TMPDIR


_use_ram_for_temporary_files()
_FAST_COMPILE = ("--xla_cpu_multi_thread_eigen=true --xla_backend_optimization_level=0 "
                 "--xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()
# One cache per test run: the process that starts pytest makes it (and removes it at exit); pytest-xdist's
# workers and the tests' subprocesses inherit it through the environment.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="phds_jax_test_xla_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from phds_jax import platforms  # noqa: E402  (after the environment above: it imports JAX)

if not platforms.accelerator_visible():
  os.environ.setdefault("PHDS_JAX_EXPERT_BACKEND", "ragged")
platforms.use_cpu_without_accelerator()  # the test extra installs libtpu (compile plans); no TPU probe on CPU

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VOCAB = 96

# name -> (transformers config class name, kwargs). Each covers features the issue asks to test.
HF_VARIANTS = {
    # OLMoE: GQA, q/k norm, clip_qkv, renormalised top-k.
    "olmoe_gqa_clip_norm": ("OlmoeConfig", dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, clip_qkv=0.6, norm_topk_prob=True)),
    # OLMoE as released: no GQA, no clip, no renormalisation; attention bias on for coverage.
    "olmoe_plain_bias": ("OlmoeConfig", dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_experts=6, num_experts_per_tok=3, attention_bias=True, rope_parameters={
            "rope_type": "default", "rope_theta": 500.0})),
    # Qwen2-MoE: shared expert, qkv bias, GQA, sparse step 2 and an mlp-only layer (dense layers 0, 2, 3).
    "qwen_sparse_step": ("Qwen2MoeConfig", dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        num_experts=8, num_experts_per_tok=2, decoder_sparse_step=2, mlp_only_layers=[3])),
    # Qwen2-MoE: every layer MoE but layer 0, renormalised top-k, tied embeddings.
    "qwen_norm_tied": ("Qwen2MoeConfig", dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        num_experts=6, num_experts_per_tok=4, mlp_only_layers=[0], norm_topk_prob=True,
        tie_word_embeddings=True)),
    # Qwen3-MoE: per-head q/k norm, head_dim != hidden / heads, GQA, sparse step 2 and an mlp-only layer
    # (dense layers 0, 2), renormalised top-k.
    "qwen3_sparse_step": ("Qwen3MoeConfig", dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, moe_intermediate_size=16, head_dim=12,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=3,
        decoder_sparse_step=2, mlp_only_layers=[2], norm_topk_prob=True)),
    # Qwen3-MoE: every layer MoE, plain top-k weights, attention bias, tied embeddings.
    "qwen3_bias_tied": ("Qwen3MoeConfig", dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, num_experts=6, num_experts_per_tok=2, attention_bias=True,
        tie_word_embeddings=True)),
    # Mixtral: GQA, top-2 of 6, always renormalised.
    "mixtral_gqa": ("MixtralConfig", dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2, sliding_window=None)),
}


def build_hf_model(variant: str, seed: int = 0, dtype=None):
  """A random transformers model for `variant`, with weights large enough that routing matters."""
  import torch
  import transformers

  cls_name, kwargs = HF_VARIANTS[variant]
  config = getattr(transformers, cls_name)(**kwargs, attn_implementation="eager",
                                           eos_token_id=2, pad_token_id=1, bos_token_id=0)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        p.uniform_(0.5, 1.5)
      else:
        p.normal_(0.0, 0.25)
  model.eval()
  if dtype is not None:
    model = model.to(dtype)
  return model


def set_hf_k(model, k):
  """Sets every router of a transformers MoE to top-k (an int, or a list with one entry per MoE layer)."""
  routers = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
  ks = k if isinstance(k, (list, tuple)) else [k] * len(routers)
  assert len(ks) == len(routers)
  for router, value in zip(routers, ks):
    router.top_k = value


def hf_logits(model, tokens, k):
  import torch

  set_hf_k(model, k)
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens))).logits.float().numpy()


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
  """variant -> (HF model directory on disk, the torch model)."""
  out = {}
  for variant in HF_VARIANTS:
    model = build_hf_model(variant)
    path = str(tmp_path_factory.mktemp(variant))
    model.save_pretrained(path)
    out[variant] = (path, model)
  return out


@pytest.fixture
def tokens():
  return np.random.RandomState(0).randint(0, VOCAB, size=(2, 11)).astype(np.int32)


TOY_WORDS = [f"w{i}" for i in range(40)]


def write_toy_tokenizer(directory):
  """A word-level transformers tokenizer (vocab 49) for the toy tasks; returns its directory."""
  from phds_jax.data import synthetic

  return synthetic.write_tokenizer(str(directory), synthetic.SPECIALS + TOY_WORDS + ["say", "first", "last", "of", ":"])


def write_toy_sft(path, n=300, seed=0, bad_lines=()):
  """JSONL of 'say first|last of : w.. w..' -> the first/last word; `bad_lines` are inserted verbatim."""
  import json
  import random

  rng = random.Random(seed)
  lines = []
  for _ in range(n):
    words = [rng.choice(TOY_WORDS) for _ in range(rng.randint(3, 8))]
    which = rng.choice(["first", "last"])
    lines.append(json.dumps({"prompt": f"say {which} of : " + " ".join(words),
                             "response": words[0] if which == "first" else words[-1]}))
  for at, text in bad_lines:
    lines.insert(at, text)
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return str(path)


def set_fields(config, **changes):
  """Sets dotted fields ("train.steps": 5) of a ConfigDict; returns it."""
  from phds_jax.cli import configs

  return configs.set_fields(config, changes)


def load_config(name, arg=None, **changes):
  """configs/<name>.py's get_config(arg) with dotted `changes`, as the command line would build it."""
  import importlib.util

  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return set_fields(module.get_config(arg), **changes)


def toy_train_config(tmp_path, **changes):
  """A seconds-long training config on the toy task (tiny OLMoE, float32)."""
  from phds_jax.cli.configs import base_config

  c = base_config()
  c.model.random_init = True
  c.tokenizer_path = write_toy_tokenizer(tmp_path / "tok")
  c.model.overrides = {"vocab_size": 64, "num_hidden_layers": 1}  # one layer: half the compile time
  c.data.train_files = write_toy_sft(tmp_path / "sft.jsonl")
  c.data.seq_len = 64
  c.data.max_loss_tokens = 8
  c.phds.k_values = "1,2"
  c.eval.k_values = "1,2"
  c.eval.every = 10
  c.train.steps = 20
  c.train.batch_size = 8
  c.train.compute_dtype = "float32"
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 2
  c.checkpoint.every = 10
  c.checkpoint.async_save = False
  c.log_every = 5
  c.export_hf = False
  return set_fields(c, **changes)


def pytest_configure(config):
  """One garbage collection, not pytest's five, when a worker ends before it reports objects whose __del__
  raised: with JAX's and torch's heaps each takes ~1 s, at the very end of the run."""
  from _pytest import unraisableexception  # pylint: disable=import-outside-toplevel
  key = getattr(unraisableexception, "gc_collect_iterations_key", None)
  if key is not None:
    config.stash[key] = 1


def pytest_unconfigure(config):
  """A pytest-xdist worker leaves without tearing JAX down: its results are with the controller by now, and
  the interpreter's teardown of XLA's backends and compiled programs kept the controller waiting ~5 s at
  the end of every run (measured with faulthandler: jax's clear_backends, then XLA's destructors)."""
  del config
  if "PYTEST_XDIST_WORKER" in os.environ:
    atexit.register(_leave_now)  # registered last, so it runs before JAX's own atexit clean-up


def _leave_now():
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0)  # pylint: disable=protected-access


def _module_fixtures(item) -> set:
  """(file, name) of the module-scoped fixtures `item` uses: tests sharing one should run on one worker,
  or each worker builds it again (the trainer's `runs` takes ~20 s)."""
  defs = item._fixtureinfo.name2fixturedefs  # pylint: disable=protected-access
  return {(str(item.path), name) for name, fixture in defs.items() if fixture and fixture[-1].scope == "module"}


def pytest_collection_modifyitems(config, items):
  """Longest first, spread over the workers, and tests sharing a module-scoped fixture on one worker.

  pytest-xdist's worksteal gives each worker an equal, contiguous share of this order at the start; a worker
  that finishes early steals the last half of another's queue instead of waiting on a long test started last.
  So each share begins with its part of the `slow` tests, those sharing a module fixture with other tests
  first, each followed by those tests (at the front of the queue nothing is stolen), then the rest, whose
  share boundary never splits the users of one module fixture."""
  del config
  workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
  fixtures = {item.nodeid: _module_fixtures(item) for item in items}
  shares = lambda a, b: bool(fixtures[a.nodeid] & fixtures[b.nodeid])
  slow = [item for item in items if item.get_closest_marker("slow")]
  rest = [item for item in items if not item.get_closest_marker("slow")]
  queues = []
  for w in range(workers):
    groups = []
    for item in slow[w::workers]:  # each slow test with the tests sharing its module fixtures
      followers = [other for other in rest if shares(other, item)]
      rest = [other for other in rest if other not in followers]
      groups.append([item, *followers])
    groups.sort(key=len, reverse=True)  # shared fixtures first: their users run before anything is stolen
    queues.append([item for group in groups for item in group])
  size = -(-len(items) // workers)
  for queue in queues[:-1]:
    take = max(0, size - len(queue))
    while 0 < take < len(rest) and shares(rest[take], rest[take - 1]):
      take += 1  # keep one module fixture's users together
    queue += rest[:take]
    rest = rest[take:]
  queues[-1] += rest
  items[:] = [item for queue in queues for item in queue]
