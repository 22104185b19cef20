"""Admission and the decode loop: one thread moves requests from a bounded waiting queue into free decode
slots between steps, runs the steps, turns tokens into text and hands each request its events.

The HTTP layer only validates, calls `submit` and relays events. A full queue is refused at once
(`QueueFull`: the caller answers 429), never grown; `drain` stops admission, lets in-flight requests
finish until a deadline, then ends the rest with finish_reason "shutdown".
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import threading
import time
from typing import Any, Callable, Optional

from phds_jax.serve.engine import Engine, SlotSettings, compiled_programs

SHUTDOWN = "shutdown"  # finish_reason of requests cut by a drain's deadline


class QueueFull(Exception):
  """The waiting queue is at its bound."""


class NotAccepting(Exception):
  """The server is loading or draining."""


@dataclasses.dataclass(eq=False)
class Request:
  """One generation: token ids in, events out. `emit(event)` is called from the scheduler thread with
  {"text", "tokens", "logprobs"} per step that produced text, then {"finish_reason", "usage"} once."""

  prompt: list[int]
  max_tokens: int
  settings: SlotSettings
  emit: Callable[[dict], None]
  stop_ids: frozenset = frozenset()
  stop_strings: tuple[str, ...] = ()
  logprobs: Optional[int] = None  # alternatives per token (0: only the chosen token's); None: none
  created: float = dataclasses.field(default_factory=time.monotonic)
  tokens: list = dataclasses.field(default_factory=list)
  sent: int = 0  # characters of the decoded text already emitted
  admitted: Optional[float] = None
  first_token: Optional[float] = None
  cancelled: bool = False
  finished: bool = False


class Scheduler:
  """Runs `engines` ({"plain": Engine, optionally "roe": Engine with members > 1}) from one thread."""

  def __init__(self, engines: dict[str, Engine], tokenizer: Any, *, max_waiting: int, metrics: Any,
               context: Callable[[], Any] = contextlib.nullcontext):
    self.engines, self.tokenizer, self.metrics = engines, tokenizer, metrics
    self.max_waiting, self._context = max_waiting, context
    self._waiting: collections.deque[Request] = collections.deque()
    self._slots: dict[str, list[Optional[Request]]] = {name: [None] * e.slots for name, e in engines.items()}
    self._states: dict[str, Any] = {}
    self._lock = threading.Condition()
    self._accepting, self._running = False, False
    self._thread: Optional[threading.Thread] = None
    self.step_seconds: dict[int, float] = {}  # plain engine: decode-step time per width (start-up, then live)

  # -- the HTTP side ---------------------------------------------------------------------------------
  def submit(self, request: Request) -> None:
    with self._lock:
      if not self._accepting:
        raise NotAccepting()
      if len(self._waiting) >= self.max_waiting:
        self.metrics.rejected.inc()
        raise QueueFull()
      self._waiting.append(request)
      self.metrics.waiting.set(len(self._waiting))
      self._lock.notify()

  def cancel(self, request: Request) -> None:
    """The client went away: the request stops at the next step and its slot is freed."""
    with self._lock:
      request.cancelled = True
      self._lock.notify()

  def slots_in_use(self) -> int:
    with self._lock:
      return sum(r is not None for slots in self._slots.values() for r in slots)

  @property
  def accepting(self) -> bool:
    return self._accepting

  # -- lifecycle -------------------------------------------------------------------------------------
  def start(self) -> None:
    with self._context():
      self._states = {name: e.init_decode_state() for name, e in self.engines.items()}
    self._running = self._accepting = True
    self._thread = threading.Thread(target=self._loop, name="phds-serve-scheduler", daemon=True)
    self._thread.start()

  def drain(self, deadline_s: float) -> None:
    """Stops admission; waits until nothing is waiting or decoding, at most `deadline_s`; then ends what is
    left with finish_reason "shutdown" and stops the loop."""
    with self._lock:
      self._accepting = False
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
      with self._lock:
        if not self._waiting and not self._busy():
          break
      time.sleep(0.02)
    with self._lock:
      self._running = False
      self._lock.notify()
    if self._thread is not None:
      self._thread.join(timeout=60)
    for request in list(self._waiting) + [r for slots in self._slots.values() for r in slots if r]:
      self._finish(request, SHUTDOWN)

  # -- the loop --------------------------------------------------------------------------------------
  def _loop(self) -> None:
    with self._context():
      while True:
        with self._lock:
          while self._running and not self._waiting and not self._busy():
            self._lock.wait(0.5)
          if not self._running:
            return
          admitted = self._take_admissible()
        for name, slot, request in admitted:
          self._admit(name, slot, request)
        for name, engine in self.engines.items():
          if any(self._slots[name]):
            self._step(name, engine)

  def _busy(self) -> bool:
    return any(r is not None for slots in self._slots.values() for r in slots)

  def _take_admissible(self) -> list[tuple[str, int, Request]]:
    """Waiting requests that fit a free slot of their engine, in arrival order (under the lock)."""
    out, kept = [], collections.deque()
    free = {name: [i for i, r in enumerate(slots) if r is None] for name, slots in self._slots.items()}
    while self._waiting:
      request = self._waiting.popleft()
      if request.cancelled:
        self._finish(request, "cancelled")
        continue
      name = "roe" if request.settings.roe and request.settings.roe[0] > 1 else "plain"
      if free[name]:
        slot = free[name].pop(0)
        self._slots[name][slot] = request
        out.append((name, slot, request))
      else:
        kept.append(request)
    self._waiting = kept
    self.metrics.waiting.set(len(kept))
    return out

  def _admit(self, name: str, slot: int, request: Request) -> None:
    engine = self.engines[name]
    request.admitted = time.monotonic()
    self.metrics.queue_seconds.observe(request.admitted - request.created)
    self.metrics.requests_by_k.labels(k=str(max(request.settings.k))).inc()
    prefix = engine.prefill(request.prompt, request.settings.k)
    self._states[name] = engine.insert(prefix, self._states[name], slot, request.prompt[-1], request.settings)
    self._update_gauges()

  def _step(self, name: str, engine: Engine) -> None:
    width, _ = engine.step_shape()
    start = time.perf_counter()
    self._states[name], result = engine.generate(self._states[name])
    elapsed = time.perf_counter() - start
    if name == "plain":
      previous = self.step_seconds.get(width)
      self.step_seconds[width] = elapsed if previous is None else 0.9 * previous + 0.1 * elapsed
      self.metrics.step_seconds.labels(width=str(width)).set(self.step_seconds[width])
    now = time.monotonic()
    for slot, request in enumerate(self._slots[name]):
      if request is None:
        continue
      if request.cancelled:
        self._release(name, slot, request, "cancelled")
        continue
      token = int(result.token[slot])
      if request.first_token is None:
        request.first_token = now
        self.metrics.ttft.observe(now - request.created)
      reason = self._advance(request, token, result, slot)
      if reason:
        self._release(name, slot, request, reason)

  def _advance(self, request: Request, token: int, result, slot: int) -> Optional[str]:
    """Adds one token to `request`, emits the text it completes; returns a finish reason or None."""
    if token in request.stop_ids:
      return "stop"
    request.tokens.append(token)
    text = self.tokenizer.decode(request.tokens, skip_special_tokens=True)
    reason = "length" if len(request.tokens) >= request.max_tokens else None
    cut = min((text.find(s) for s in request.stop_strings if s in text), default=-1)
    if cut >= 0:
      text, reason = text[:cut], "stop"
    elif reason is None:
      text = text[:len(text) - _held_back(text, request.stop_strings)]
    piece = text[request.sent:] if len(text) > request.sent else ""
    event: dict[str, Any] = {"text": piece, "tokens": [token]}
    if request.logprobs is not None:
      decode = lambda t: self.tokenizer.decode([int(t)])
      event["logprobs"] = {
          "token": decode(token), "logprob": float(result.logprob[slot]),
          "top": {decode(t): float(lp) for t, lp in
                  itertools.islice(zip(result.top_tokens[slot], result.top_logprobs[slot]), request.logprobs)}}
    if piece or request.logprobs is not None:
      request.sent += len(piece)
      request.emit(event)
    return reason

  def _release(self, name: str, slot: int, request: Request, reason: str) -> None:
    with self._lock:
      self._slots[name][slot] = None
    self.engines[name].free(slot)
    self._finish(request, reason)
    self._update_gauges()

  def _finish(self, request: Request, reason: str) -> None:
    if request.finished:
      return
    request.finished = True
    now = time.monotonic()
    n = len(request.tokens)
    self.metrics.requests.labels(finish_reason=reason).inc()
    self.metrics.generated_tokens.inc(n)
    self.metrics.prompt_tokens.inc(len(request.prompt))
    if request.first_token is not None:
      self.metrics.e2e_seconds.observe(now - request.created)
      if n > 1:
        self.metrics.tpot.observe((now - request.first_token) / (n - 1))
    request.emit({"finish_reason": reason, "usage": {"prompt_tokens": len(request.prompt),
                                                      "completion_tokens": n,
                                                      "total_tokens": len(request.prompt) + n}})

  def _update_gauges(self) -> None:
    for name, slots in self._slots.items():
      self.metrics.slots_in_use.labels(engine=name).set(sum(r is not None for r in slots))
    self.metrics.programs.set(compiled_programs())


def _held_back(text: str, stops: tuple[str, ...]) -> int:
  """Characters at the end of `text` that could begin a stop string (not streamed until resolved), plus an
  incomplete multi-byte character (decoded as U+FFFD)."""
  hold = 1 if text.endswith("\ufffd") else 0
  for stop in stops:
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
      if text.endswith(stop[:n]):
        hold = max(hold, n)
        break
  return hold
