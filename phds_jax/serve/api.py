"""The OpenAI-compatible HTTP routes (FastAPI): validate, submit to the scheduler, relay its events.

Extra body fields (also inside `vllm_xargs`): `k` (an int, or one per MoE layer), `roe`
({"members", "tau", "seed"}) and `latency_budget_ms` (per output token: the largest k whose measured decode
step fits). Every response carries a `phds` object saying which k (and ensemble) it used.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import numbers
import os
import secrets
import time
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from phds_jax.serve import scheduler as sched
from phds_jax.serve.engine import SlotSettings

PAGE = os.path.join(os.path.dirname(__file__), "page", "index.html")
DISCONNECT_POLL_S = 0.25  # a non-streamed request checks this often whether its client is still there


class ApiError(Exception):
  """An HTTP error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

  def __init__(self, status: int, message: str, param: Optional[str] = None, headers: Optional[dict] = None):
    super().__init__(message)
    self.status, self.message, self.param, self.headers = status, message, param, headers or {}


@dataclasses.dataclass
class Limits:
  """What a request may ask (from the config's serve block and the model)."""

  num_experts: int
  k_pre: int
  k_max: int
  n_moe: int
  max_len: int
  max_tokens: int
  roe_members: int  # 0: no ensemble engine
  max_body_bytes: int


@dataclasses.dataclass
class ServerState:
  """What the routes share: set by the loader thread once the model is ready."""

  model_id: str
  api_key: str = ""
  limits: Optional[Limits] = None
  scheduler: Optional[sched.Scheduler] = None
  tokenizer: Any = None
  metrics: Any = None
  eos_ids: frozenset = frozenset()
  draining: bool = False
  created: int = dataclasses.field(default_factory=lambda: int(time.time()))

  @property
  def ready(self) -> bool:
    return self.scheduler is not None and self.scheduler.accepting and not self.draining


# -- request fields ---------------------------------------------------------------------------------------
def _int(body: dict, name: str, default, low: int, high: Optional[int] = None) -> int:
  value = body.get(name, default)
  if value is None:
    value = default
  if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low or (
      high is not None and value > high):
    bound = f"[{low}, {high}]" if high is not None else f">= {low}"
    raise ApiError(400, f"{name}={value!r} must be an integer in {bound}", name)
  return int(value)


def _float(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
  value = body.get(name, default)
  if value is None:
    value = default
  if (not isinstance(value, numbers.Real) or isinstance(value, bool) or value > high or value < low
      or (low_open and value == low)):
    raise ApiError(400, f"{name}={value!r} must be a number in {'(' if low_open else '['}{low}, {high}]", name)
  return float(value)


def _k(value, limits: Limits) -> tuple[int, ...]:
  """`k`: an int for every MoE layer or a list with one per MoE layer, each in [1, k_max]."""
  values = value if isinstance(value, list) else [value]
  if isinstance(value, list) and len(value) != limits.n_moe:
    raise ApiError(400, f"k has {len(value)} entries; the model has {limits.n_moe} MoE layers "
                   "(give one int, or one per MoE layer)", "k")
  for v in values:
    if not isinstance(v, numbers.Integral) or isinstance(v, bool) or not 1 <= v <= limits.k_max:
      raise ApiError(400, f"k={value!r}: each k must be an integer in [1, {limits.k_max}]", "k")
  return tuple(int(v) for v in values) if isinstance(value, list) else (int(value),) * limits.n_moe


def _roe(value, limits: Limits) -> Optional[tuple[int, tuple[float, ...], int]]:
  if value is None:
    return None
  if not isinstance(value, dict) or set(value) - {"members", "tau", "seed"}:
    raise ApiError(400, "roe must be an object {\"members\": int, \"tau\": float or one per MoE layer, "
                   "\"seed\": int}", "roe")
  members = value.get("members", 1)
  if not limits.roe_members and members != 1:
    raise ApiError(400, "this server runs no ensemble engine (serve.roe_members=0): roe.members must be 1", "roe")
  if not isinstance(members, numbers.Integral) or isinstance(members, bool) or not 1 <= members <= max(
      limits.roe_members, 1):
    raise ApiError(400, f"roe.members={members!r} must be an integer in [1, {max(limits.roe_members, 1)}]", "roe")
  tau = value.get("tau", 0.0)
  taus = tau if isinstance(tau, list) else [tau] * limits.n_moe
  if len(taus) != limits.n_moe or not all(isinstance(t, numbers.Real) and not isinstance(t, bool) and t >= 0
                                          for t in taus):
    raise ApiError(400, f"roe.tau={tau!r} must be a number >= 0 or a list of {limits.n_moe} (one per MoE layer)",
                   "roe")
  seed = value.get("seed", 0)
  if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
    raise ApiError(400, f"roe.seed={seed!r} must be an integer", "roe")
  return members, tuple(float(t) for t in taus), int(seed)


def _stop(body: dict) -> tuple[str, ...]:
  stop = body.get("stop")
  if stop is None:
    return ()
  stops = [stop] if isinstance(stop, str) else stop
  if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
    raise ApiError(400, "stop must be a non-empty string or a list of at most 4", "stop")
  return tuple(stops)


def choose_k(budget_ms: float, step_seconds: dict[int, float], k_max: int, widths) -> tuple[int, bool]:
  """The largest k whose decode step (measured per expert width) fits `budget_ms` per token; (1, False)
  when none does."""
  best = None
  for k in range(1, k_max + 1):
    width = next(w for w in widths if w >= k)
    seconds = step_seconds.get(width)
    if seconds is not None and seconds * 1000.0 <= budget_ms:
      best = k
  return (best, True) if best is not None else (1, False)


def parse_request(body: Any, state: ServerState, chat: bool) -> tuple[sched.Request, dict]:
  """Validates a completions / chat body -> (a Request without its emit, the response's `phds` object)."""
  limits = state.limits
  if not isinstance(body, dict):
    raise ApiError(400, "the body must be a JSON object", "body")
  extra = body.get("vllm_xargs") or {}
  if not isinstance(extra, dict):
    raise ApiError(400, "vllm_xargs must be an object", "vllm_xargs")
  body = {**body, **{key: value for key, value in extra.items() if key in ("k", "roe", "latency_budget_ms")}}
  model = body.get("model")
  if model is not None and model != state.model_id:
    raise ApiError(404, f"model {model!r} is not served here; GET /v1/models lists {state.model_id!r}", "model")
  if _int(body, "n", 1, 1) != 1:
    raise ApiError(400, "n must be 1 (one choice per request)", "n")
  prompt = _chat_prompt(body, state) if chat else _completion_prompt(body, state)
  if not prompt:
    raise ApiError(400, "the prompt is empty", "messages" if chat else "prompt")
  room = limits.max_len - len(prompt)
  if room < 1:
    raise ApiError(400, f"the prompt has {len(prompt)} tokens; at most {limits.max_len - 1} fit "
                   f"(serve.max_len={limits.max_len})", "messages" if chat else "prompt")
  default_tokens = 16 if not chat else min(limits.max_tokens, room)
  name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
  max_tokens = _int(body, name, default_tokens, 1, limits.max_tokens)
  if max_tokens > room:
    raise ApiError(400, f"{name}={max_tokens} with a {len(prompt)}-token prompt exceeds serve.max_len="
                   f"{limits.max_len} (at most {room})", name)
  temperature = _float(body, "temperature", 1.0, 0.0, 2.0)
  top_p = _float(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
  seed = body.get("seed")
  seed = secrets.randbits(31) if seed is None else _int(body, "seed", 0, -(2**63))
  logprobs = None
  if not chat and body.get("logprobs") is not None:
    logprobs = _int(body, "logprobs", 0, 0, 5)
  elif chat and body.get("logprobs"):
    raise ApiError(400, "logprobs are returned by /v1/completions only", "logprobs")
  if body.get("k") is not None and body.get("latency_budget_ms") is not None:
    raise ApiError(400, "give k or latency_budget_ms, not both", "latency_budget_ms")
  phds: dict[str, Any] = {}
  if body.get("latency_budget_ms") is not None:
    budget = _float(body, "latency_budget_ms", 0.0, 0.0, 1e9, low_open=True)
    engine = state.scheduler.engines["plain"]
    chosen, met = choose_k(budget, state.scheduler.step_seconds, limits.k_max, engine.widths)
    k = (chosen,) * limits.n_moe
    phds.update(latency_budget_ms=budget, latency_budget_met=met,
                decode_ms_per_token={str(w): round(s * 1000, 3) for w, s in state.scheduler.step_seconds.items()})
  else:
    k = _k(body["k"], limits) if body.get("k") is not None else (limits.k_pre,) * limits.n_moe
  roe = _roe(body.get("roe"), limits)
  phds["k"] = k[0] if len(set(k)) == 1 else list(k)
  if roe is not None:
    phds["roe"] = {"members": roe[0], "tau": roe[1][0] if len(set(roe[1])) == 1 else list(roe[1]), "seed": roe[2]}
  if body.get("stream_options") is not None and not body.get("stream"):
    raise ApiError(400, "stream_options needs stream=true", "stream_options")
  request = sched.Request(prompt=prompt, max_tokens=max_tokens,
                          settings=SlotSettings(k=k, temperature=temperature, top_p=top_p, seed=seed, roe=roe),
                          emit=lambda event: None, stop_ids=state.eos_ids, stop_strings=_stop(body),
                          logprobs=logprobs)
  return request, phds


def _completion_prompt(body: dict, state: ServerState) -> list[int]:
  prompt = body.get("prompt")
  if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
    prompt = prompt[0]  # a batch of one
  if isinstance(prompt, str):
    return list(state.tokenizer(prompt)["input_ids"])
  vocab = len(state.tokenizer)
  if isinstance(prompt, list) and all(isinstance(t, numbers.Integral) and not isinstance(t, bool) and 0 <= t < vocab
                                      for t in prompt):
    return [int(t) for t in prompt]
  raise ApiError(400, "prompt must be a string or a list of token ids (one prompt per request)", "prompt")


def _chat_prompt(body: dict, state: ServerState) -> list[int]:
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages:
    raise ApiError(400, "messages must be a non-empty list of {\"role\", \"content\"}", "messages")
  plain = []
  for i, message in enumerate(messages):
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
      raise ApiError(400, f"messages[{i}] must be an object with a role and content", "messages")
    content = message.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
      if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        raise ApiError(400, f"messages[{i}].content: only text parts are supported", "messages")
      content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
      raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")
    plain.append({"role": message["role"], "content": content})
  return chat_token_ids(state.tokenizer, plain)


def chat_token_ids(tokenizer, messages: list[dict]) -> list[int]:
  """The tokenizer's chat template with the assistant's turn opened; without a template, lines of
  "role: content" ending with "assistant:" (stated in docs/serving.md)."""
  if getattr(tokenizer, "chat_template", None):
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
  text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
  return list(tokenizer(text)["input_ids"])


# -- the app ---------------------------------------------------------------------------------------------
def create_app(state: ServerState):
  """The FastAPI application over `state` (routes answer 503 until state.ready)."""
  app = FastAPI(title="phds_jax", docs_url=None, redoc_url=None, openapi_url=None)

  def error(e: ApiError):
    if state.metrics is not None and e.status == 400:
      state.metrics.errors.labels(param=e.param or "").inc()
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            429: "rate_limit_error", 503: "service_unavailable"}.get(e.status, "error")
    return JSONResponse({"error": {"message": e.message, "type": kind, "param": e.param, "code": None}},
                        status_code=e.status, headers=e.headers)

  def guard(app_):
    """A plain ASGI wrapper (not BaseHTTPMiddleware, which hides a client's disconnect from the routes):
    the API key on every route but /health, and the body-size limit from its declared length."""

    async def guarded(scope, receive, send):
      if scope["type"] == "http":
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        problem = None
        if state.api_key and scope["path"] != "/health" and not secrets.compare_digest(
            headers.get("authorization", "").encode(), f"Bearer {state.api_key}".encode()):
          problem = ApiError(401, "missing or wrong API key (Authorization: Bearer ...)")
        size = headers.get("content-length", "")
        limit = state.limits.max_body_bytes if state.limits else 1 << 20
        if problem is None and size.isdigit() and int(size) > limit:
          problem = ApiError(400, f"the body has {size} bytes; at most {limit} (serve.max_body_bytes)", "body")
        if problem is not None:
          return await error(problem)(scope, receive, send)
      return await app_(scope, receive, send)

    return guarded

  @app.exception_handler(ApiError)
  async def api_error(_, e: ApiError):
    return error(e)

  @app.get("/health")
  async def health():
    if state.ready:
      return {"status": "ok"}
    return JSONResponse({"status": "draining" if state.draining else "loading"}, status_code=503)

  @app.get("/metrics")
  async def metrics():
    if state.metrics is None:
      raise ApiError(503, "the server is loading")
    return Response(state.metrics.text(), media_type="text/plain; version=0.0.4")

  @app.get("/v1/models")
  async def models():
    data = {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "phds_jax"}
    if state.limits is not None:
      data["phds"] = dataclasses.asdict(state.limits)
    return {"object": "list", "data": [data]}

  @app.get("/", response_class=HTMLResponse)
  async def page():
    with open(PAGE, encoding="utf-8") as f:
      return f.read()

  async def generate(request: Request, chat: bool):
    if not state.ready:
      raise ApiError(503, "the server is draining" if state.draining else "the server is loading",
                     headers={"Retry-After": "1"})
    raw = await request.body()
    if len(raw) > state.limits.max_body_bytes:
      raise ApiError(400, f"the body has {len(raw)} bytes; at most {state.limits.max_body_bytes} "
                     "(serve.max_body_bytes)", "body")
    try:
      body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ApiError(400, f"the body is not valid JSON: {e}", "body") from None
    req, phds = parse_request(body, state, chat)
    events: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    req.emit = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
    try:
      state.scheduler.submit(req)
    except sched.QueueFull:
      raise ApiError(429, f"the waiting queue is full ({state.scheduler.max_waiting} requests); retry later",
                     headers={"Retry-After": "1"}) from None
    except sched.NotAccepting:
      raise ApiError(503, "the server is draining", headers={"Retry-After": "1"}) from None
    stamp = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}", "created": int(time.time()),
             "model": state.model_id}
    if body.get("stream"):
      usage = bool((body.get("stream_options") or {}).get("include_usage"))
      return StreamingResponse(_stream(state, req, events, stamp, phds, chat, usage), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache"})
    try:
      pieces, logprobs, end = [], [], None
      checked = time.monotonic()
      while end is None:
        try:
          event = await asyncio.wait_for(events.get(), timeout=DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
          event = None
        if time.monotonic() - checked >= DISCONNECT_POLL_S:
          checked = time.monotonic()
          if await request.is_disconnected():  # the client went away: free the slot (finally, below)
            return Response(status_code=499)
        if event is None:
          continue
        if "finish_reason" in event:
          end = event
        else:
          pieces.append(event["text"])
          if "logprobs" in event:
            logprobs.append(event["logprobs"])
    finally:
      if not req.finished:
        state.scheduler.cancel(req)
    text = "".join(pieces)
    if chat:
      choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": end["finish_reason"],
                "logprobs": None}
    else:
      choice = {"index": 0, "text": text, "finish_reason": end["finish_reason"],
                "logprobs": _completion_logprobs(logprobs) if req.logprobs is not None else None}
    return {**stamp, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
            "usage": end["usage"], "phds": phds}

  @app.post("/v1/completions")
  async def completions(request: Request):
    return await generate(request, chat=False)

  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    return await generate(request, chat=True)

  return guard(app)


def _completion_logprobs(steps: list[dict]) -> dict:
  """OpenAI's completions logprobs object from the per-token events."""
  offsets, at = [], 0
  for step in steps:
    offsets.append(at)
    at += len(step["token"])
  return {"tokens": [s["token"] for s in steps], "token_logprobs": [s["logprob"] for s in steps],
          "top_logprobs": [s["top"] for s in steps], "text_offset": offsets}


async def _stream(state: ServerState, req: sched.Request, events: asyncio.Queue, stamp: dict, phds: dict,
                  chat: bool, include_usage: bool):
  """SSE chunks in OpenAI's format; a client that goes away cancels the request (its slot is freed)."""
  kind = "chat.completion.chunk" if chat else "text_completion"

  def chunk(choice: Optional[dict], **extra) -> str:
    return "data: " + json.dumps({**stamp, "object": kind, "choices": [choice] if choice else [], **extra}) + "\n\n"

  try:
    if chat:
      yield chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}, phds=phds)
    while True:
      event = await events.get()
      if "finish_reason" in event:
        reason = event["finish_reason"]
        if chat:
          yield chunk({"index": 0, "delta": {}, "finish_reason": reason}, phds=phds)
        else:
          yield chunk({"index": 0, "text": "", "finish_reason": reason, "logprobs": None}, phds=phds)
        if include_usage:
          yield chunk(None, usage=event["usage"])
        yield "data: [DONE]\n\n"
        return
      if chat:
        yield chunk({"index": 0, "delta": {"content": event["text"]}, "finish_reason": None}, phds=phds)
      else:
        logprobs = _completion_logprobs([event["logprobs"]]) if "logprobs" in event else None
        yield chunk({"index": 0, "text": event["text"], "finish_reason": None, "logprobs": logprobs}, phds=phds)
  finally:
    if not req.finished:
      state.scheduler.cancel(req)
