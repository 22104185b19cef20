"""`serve` mode: the HTTP server starts at once (GET /health answers 503 "loading"), a loader thread loads
the model sharded over the local devices, compiles every program and measures the decode step per width,
then the scheduler starts and one line says the server is ready. SIGTERM drains: /health turns 503,
nothing new is admitted, in-flight requests finish until serve.drain_seconds, the process exits 0.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

from phds_jax.serve import api
from phds_jax.serve.metrics import ServeMetrics

BUILTIN_EXPORT = os.path.join("workdir", "tiny", "phds", "hf_export")  # configs/tiny.py's PHDS export


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(v) for v in text.split(",") if v.strip())


def model_id(config) -> str:
  return config.serve.model_name or os.path.basename(os.path.normpath(config.model_path)) or "model"


def build(config, state: api.ServerState, say=print) -> None:
  """Loads the model, compiles and times the programs, starts the scheduler, fills `state`."""
  import jax  # pylint: disable=g-import-not-at-top

  from phds_jax.data import pipeline as data_lib  # pylint: disable=g-import-not-at-top
  from phds_jax.io.load import load  # pylint: disable=g-import-not-at-top
  from phds_jax.model import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from phds_jax.model.transformer import resolve_expert_backend  # pylint: disable=g-import-not-at-top
  from phds_jax.serve.engine import Engine, compiled_programs  # pylint: disable=g-import-not-at-top
  from phds_jax.serve.scheduler import Scheduler  # pylint: disable=g-import-not-at-top

  s = config.serve
  mesh = sharding_lib.make_mesh(dict(config.mesh))
  context = lambda: sharding_lib.use_mesh(mesh, dict(config.axis_rules), config.model.expert_dispatch)
  say(f"loading {config.model_path} over {mesh.size} {jax.devices()[0].platform} device(s) "
      f"(mesh {dict(mesh.shape)}) ...")
  with context():
    cfg, params = load(config.model_path, config.model.param_dtype, sharding=mesh)
  tokenizer = data_lib.load_tokenizer(config.tokenizer_path or config.model_path)
  if len(tokenizer) > cfg.vocab_size:
    raise ValueError(f"the tokenizer has {len(tokenizer)} tokens; the model's vocabulary holds {cfg.vocab_size}")
  max_len = min(s.max_len, cfg.max_position_embeddings)
  k_max = s.k_max or cfg.num_experts
  backend = resolve_expert_backend(config.model.expert_backend)
  common = dict(max_len=max_len, buckets=_ints(s.buckets) or None, widths=_ints(s.widths) or None, k_max=k_max,
                expert_backend=backend)
  engines = {"plain": Engine(cfg, params, slots=s.slots, rows=_ints(s.rows) or None, **common)}
  if s.roe_members > 1 and s.roe_slots > 0:
    engines["roe"] = Engine(cfg, params, slots=s.roe_slots, members=s.roe_members, rows=(s.roe_slots,), **common)
  total = sum(len(e.buckets) + len(e.widths) * len(e.rows) for e in engines.values())
  done, shown = [0], [time.perf_counter()]

  def report(name: str, what: str) -> None:  # a line every 5 s, and at the end
    done[0] += 1
    if time.perf_counter() - shown[0] >= 5 or done[0] == total:
      shown[0] = time.perf_counter()
      say(f"  compiled {done[0]}/{total} ({name} {what})")

  start = time.perf_counter()
  say(f"compiling {total} programs (prompt buckets {engines['plain'].buckets}, expert widths "
      f"{engines['plain'].widths}, row buckets {engines['plain'].rows}) ...")
  with context():
    for name, engine in engines.items():
      engine.warm_up(lambda what, name=name: report(name, what))
  metrics = ServeMetrics()
  scheduler = Scheduler(engines, tokenizer, max_waiting=s.max_waiting, metrics=metrics, context=context)
  with context():
    scheduler.step_seconds.update(time_steps(engines["plain"], s.timing_steps))
  for name, engine in engines.items():
    metrics.slots_total.labels(engine=name).set(engine.slots)
    metrics.slots_in_use.labels(engine=name).set(0)
  for width, seconds in scheduler.step_seconds.items():
    metrics.step_seconds.labels(width=str(width)).set(seconds)
  metrics.programs.set(compiled_programs())
  eos_ids = set(cfg.eos_ids)
  if tokenizer.eos_token_id is not None:
    eos_ids.add(tokenizer.eos_token_id)
  scheduler.start()
  state.limits = api.Limits(num_experts=cfg.num_experts, k_pre=cfg.k_pre, k_max=k_max,
                            n_moe=len(cfg.moe_layer_indices), max_len=max_len, max_tokens=min(s.max_tokens, max_len - 1),
                            roe_members=s.roe_members if "roe" in engines else 0, max_body_bytes=s.max_body_bytes)
  state.tokenizer, state.metrics, state.eos_ids = tokenizer, metrics, frozenset(eos_ids)
  state.scheduler = scheduler
  timings = ", ".join(f"width {w}: {t * 1000:.1f}" for w, t in sorted(scheduler.step_seconds.items()))
  say(f"compiled in {time.perf_counter() - start:.0f} s; decode step ms ({timings})")


def time_steps(engine, steps: int) -> dict[int, float]:
  """Median seconds of a decode step with every slot busy, per compiled width."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  state = engine.init_decode_state()
  out = {}
  for width in engine.widths:  # all slots busy: the step a loaded server runs
    engine.busy_k[:] = width
    times = []
    for _ in range(max(steps, 1)):
      begin = time.perf_counter()
      state, _ = engine.generate(state)
      times.append(time.perf_counter() - begin)
    out[width] = float(np.median(times))
  engine.busy_k[:] = 0
  return out


def run(config, workdir: str) -> dict[str, Any]:
  """Serves until SIGTERM / SIGINT; returns what it served."""
  del workdir  # the server writes nothing
  import uvicorn  # pylint: disable=g-import-not-at-top

  s = config.serve
  state = api.ServerState(model_id=model_id(config), api_key=s.api_key or os.environ.get("PHDS_API_KEY", ""))
  app = api.create_app(state)
  failure: list[BaseException] = []

  class Server(uvicorn.Server):
    """uvicorn, whose first SIGTERM / SIGINT drains instead of closing the sockets."""

    draining = False

    def handle_exit(self, sig, frame):
      if self.draining or state.scheduler is None:
        return super().handle_exit(sig, frame)
      self.draining = True
      threading.Thread(target=self.drain, args=(signal.Signals(sig).name,), daemon=True).start()

    def drain(self, signame: str):
      state.draining = True
      print(f"{signame}: draining (at most {s.drain_seconds:g} s) ...", flush=True)
      state.scheduler.drain(s.drain_seconds)
      print("drained; exiting", flush=True)
      self.should_exit = True

  server = Server(uvicorn.Config(app, host=s.host, port=s.port, log_level="warning", access_log=False,
                                 timeout_graceful_shutdown=5))
  say = lambda message: print(message, flush=True)

  def load():
    try:
      build(config, state, say)
      key = " (API key required)" if state.api_key else ""
      say(f"ready: http://{s.host}:{s.port}{key}  model {state.model_id}, k 1..{state.limits.k_max} "
          f"(k_pre {state.limits.k_pre}), {s.slots} slots")
    except BaseException as e:  # pylint: disable=broad-except
      failure.append(e)
      server.should_exit = True

  threading.Thread(target=load, name="phds-serve-loader", daemon=True).start()
  server.run()
  if failure:
    raise failure[0]
  return {"served": state.model_id}
