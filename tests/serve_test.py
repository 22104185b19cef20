"""The OpenAI-compatible server: one tiny model served in this process on loopback (uvicorn in a thread),
asked through the `openai` client, httpx and a headless browser; SIGTERM draining in a subprocess."""

import concurrent.futures
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import phds_jax as pj
from conftest import ROOT, build_hf_model, set_hf_k, write_toy_tokenizer

VARIANT = "olmoe_gqa_clip_norm"  # 2 MoE layers, 8 experts, k_pre 2


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _serve_config(model_dir, **serve):
  from phds_jax.cli.configs import serve_config
  config = serve_config()
  config.model_path = str(model_dir)
  config.compile_cache = ""
  config.serve.update({**dict(port=_free_port(), slots=4, roe_slots=2, roe_members=3, max_len=64, max_tokens=40,
                              buckets="48", widths="2,8", max_waiting=16, max_body_bytes=4096, timing_steps=2),
                        **serve})
  return config


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  """(base URL, ServerState, the torch model, the model dir) of a server running in this process."""
  import uvicorn
  from phds_jax.serve import api, server
  model_dir = tmp_path_factory.mktemp("served_model")
  model = build_hf_model(VARIANT)
  model.config.max_position_embeddings = 64
  model.save_pretrained(model_dir)
  write_toy_tokenizer(model_dir)
  config = _serve_config(model_dir)
  state = api.ServerState(model_id="tiny")
  server.build(config, state, say=lambda message: None)
  http = uvicorn.Server(uvicorn.Config(api.create_app(state), host="127.0.0.1", port=config.serve.port,
                                       log_level="warning"))
  thread = threading.Thread(target=http.run, daemon=True)
  thread.start()
  while not http.started:
    time.sleep(0.02)
  yield f"http://127.0.0.1:{config.serve.port}", state, model, str(model_dir)
  http.should_exit = True
  thread.join(timeout=10)
  state.scheduler.drain(0)


@functools.cache
def _http():
  """One httpx client for this file's plain HTTP calls: httpx.get/post build a client, and with it a TLS context
  (the CA bundle parsed), per call: ~18 s of CPU over this file. Nothing kept alive: each request opens its
  own connection, as those calls did."""
  import httpx
  return httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))


def _client(url):
  import openai
  return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def _metric(url, name, **labels) -> float:
  text = _http().get(url + "/metrics").text
  want = ",".join(f'{k}="{v}"' for k, v in labels.items())
  pattern = "^" + re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)$"
  match = re.search(pattern, text, re.MULTILINE)
  return float(match.group(1)) if match else 0.0


def _prompt_ids(state, text):
  return list(state.tokenizer(text)["input_ids"])


def test_greedy_output_equals_generate_and_transformers_with_mixed_k_sharing_the_batch(served):
  """Requests at k = 1, 2, 8 and per-layer k arrive at different times and decode in one batch; each equals
  pj.generate and transformers' generate at its k; streamed equals non-streamed."""
  import torch
  url, state, model, model_dir = served
  client = _client(url)
  cfg, params = pj.load(model_dir)
  prompts = ["say first of : w1 w2 w3", "say last of : w4 w5", "say first of : w7 w8 w9 w10 w11", "of : w3"]
  ks = [1, 2, 8, [1, 3]]

  def ask(i):
    time.sleep(0.05 * i)  # arriving while the others decode
    out = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=12, temperature=0,
                                    extra_body={"k": ks[i]})
    return out.choices[0].text, out.usage.completion_tokens, out.model_extra["phds"]

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    answers = list(pool.map(ask, range(4)))
  for i, (text, n, phds) in enumerate(answers):
    assert phds["k"] == ks[i]
    ids = _prompt_ids(state, prompts[i])
    set_hf_k(model, ks[i])
    with torch.no_grad():
      hf = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=1)
    hf_new = [int(t) for t in hf[0, len(ids):]]
    expected = hf_new[:hf_new.index(2)] if 2 in hf_new else hf_new  # up to the end-of-sequence token
    if not isinstance(ks[i], list):  # pj.generate takes one k per prompt (per-layer k: transformers only)
      ours = pj.generate(cfg, params, [ids], max_new_tokens=12, k=ks[i])[0]
      assert [t for t in ours if t != 2] == expected, (i, ours, expected)
    assert n == len(expected) and text == state.tokenizer.decode(expected, skip_special_tokens=True), (i, n, text)
    stream = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=12, temperature=0, stream=True,
                                       extra_body={"k": ks[i]})
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == text
  set_hf_k(model, 2)


def test_programs_stay_flat_over_fifty_requests_with_mixed_settings(served):
  """k, per-layer k, temperature, top_p, seeds and ensembles never compile a new program."""
  url, state, _, _ = served
  before = _metric(url, "phds_serve_compiled_programs")
  rng = np.random.RandomState(0)

  def body(i):
    out = {"model": "tiny", "prompt": "say first of : w1 w2" + " w3" * int(rng.randint(0, 20)), "max_tokens": 3,
           "temperature": float(rng.choice([0.0, 0.7, 1.3])), "top_p": float(rng.choice([1.0, 0.8, 0.3])),
           "seed": int(rng.randint(1000)), "k": int(rng.randint(1, 9)) if i % 5 else [int(rng.randint(1, 9)), 1]}
    if i % 7 == 0:
      out["roe"] = {"members": int(rng.randint(2, 4)), "tau": float(rng.uniform(0.1, 1.0)), "seed": i}
    return out

  bodies = [body(i) for i in range(50)]
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    replies = list(pool.map(lambda b: _http().post(url + "/v1/completions", json=b, timeout=60), bodies))
  assert [r.status_code for r in replies] == [200] * 50
  assert all(r.json()["usage"]["completion_tokens"] <= 3 for r in replies)
  assert _metric(url, "phds_serve_compiled_programs") == before > 0
  assert _metric(url, "phds_serve_slots_in_use", engine="plain") == 0


def test_overload_at_concurrency_32_completes_or_refuses_each_request_explicitly(served):
  """4 slots, a queue of 16, 32 clients at once with mixed k: each request either gets the tokens it asked for
  (finish_reason length, or stop at the end-of-sequence token) or a 429 with Retry-After; nothing hangs."""
  url, state, _, _ = served
  bodies = [{"prompt": f"say first of : w{i} w{i + 1}", "max_tokens": 6, "temperature": 0, "k": 1 + i % 8}
            for i in range(32)]
  with concurrent.futures.ThreadPoolExecutor(32) as pool:
    replies = list(pool.map(lambda b: _http().post(url + "/v1/completions", json=b, timeout=60), bodies))
  codes = [r.status_code for r in replies]
  assert set(codes) <= {200, 429} and codes.count(200) >= 16, codes  # at least a full queue's worth is served
  for reply in replies:
    if reply.status_code == 429:
      assert reply.headers["retry-after"] == "1" and reply.json()["error"]["type"] == "rate_limit_error"
      continue
    choice, usage = reply.json()["choices"][0], reply.json()["usage"]
    assert choice["finish_reason"] == "length" and usage["completion_tokens"] == 6 or (
        choice["finish_reason"] == "stop" and usage["completion_tokens"] < 6)
  assert _metric(url, "phds_serve_slots_in_use", engine="plain") == 0
  assert _metric(url, "phds_serve_requests_waiting") == 0


def test_same_seed_same_sample_and_an_ensemble_says_what_it_used(served):
  url, _, _, _ = served
  client = _client(url)
  ask = lambda **extra: client.completions.create(model="tiny", prompt="say last of : w1 w2", max_tokens=8,
                                                  temperature=1.0, seed=7, extra_body=extra)
  assert ask(k=2).choices[0].text == ask(k=2).choices[0].text
  roe = ask(k=2, roe={"members": 3, "tau": 0.5, "seed": 1})
  assert roe.model_extra["phds"] == {"k": 2, "roe": {"members": 3, "tau": 0.5, "seed": 1}}
  one_member = client.completions.create(model="tiny", prompt="say last of : w1 w2", max_tokens=8, temperature=0,
                                         extra_body={"k": 2, "roe": {"members": 1, "tau": 0.9}})
  plain = client.completions.create(model="tiny", prompt="say last of : w1 w2", max_tokens=8, temperature=0,
                                    extra_body={"k": 2})
  assert one_member.choices[0].text == plain.choices[0].text  # one member is the deterministic model


def test_logprobs_are_the_models_log_probabilities(served):
  import jax
  url, state, _, model_dir = served
  out = _client(url).completions.create(model="tiny", prompt="say first of : w5 w6", max_tokens=3, temperature=0,
                                        logprobs=2, extra_body={"k": 1})
  lp = out.choices[0].logprobs
  cfg, params = pj.load(model_dir)
  ids = _prompt_ids(state, "say first of : w5 w6")
  logits = pj.forward(cfg, params, np.asarray([ids]), k=1)[0, -1]
  first = float(jax.nn.log_softmax(logits)[int(np.argmax(logits))])
  assert lp.token_logprobs[0] == pytest.approx(first, abs=1e-4)
  assert len(lp.top_logprobs[0]) == 2 and max(lp.top_logprobs[0].values()) == pytest.approx(first, abs=1e-4)


def test_chat_uses_the_template_or_the_plain_fallback(served):
  from phds_jax.serve import api
  url, state, _, _ = served
  client = _client(url)
  chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w1 w2"}], max_tokens=5,
                                        temperature=0, extra_body={"k": 1})
  prompt = state.tokenizer.decode(api.chat_token_ids(state.tokenizer, [{"role": "user", "content": "w1 w2"}]))
  plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0, extra_body={"k": 1})
  assert chat.choices[0].message.content == plain.choices[0].text
  stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w1 w2"}], max_tokens=5,
                                          temperature=0, stream=True, stream_options={"include_usage": True},
                                          extra_body={"vllm_xargs": {"k": 1}})
  chunks = list(stream)
  assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
  assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_bad_requests_get_400_naming_the_field(served):
  url, _, _, _ = served
  post = lambda body, **kw: _http().post(url + "/v1/completions", timeout=30, **({"json": body} | kw))
  cases = {
      "body": post(None, content=b"{not json"),
      "k": post({"prompt": "w1", "k": 9}),
      "k ": post({"prompt": "w1", "k": [1, 2, 3]}),
      "prompt": post({"prompt": "w1 " * 70}),
      "max_tokens": post({"prompt": "w1", "max_tokens": 41}),
      "body ": post(None, content=b'{"prompt": "' + b"w" * 5000 + b'"}', headers={"content-type": "application/json"}),
      "temperature": post({"prompt": "w1", "temperature": -1}),
      "roe": post({"prompt": "w1", "roe": {"members": 9}}),
      "latency_budget_ms": post({"prompt": "w1", "k": 1, "latency_budget_ms": 5}),
  }
  for param, reply in cases.items():
    assert reply.status_code == 400, (param, reply.text)
    assert reply.json()["error"]["param"] == param.strip(), (param, reply.json())
  assert "k has 3 entries; the model has 2 MoE layers" in cases["k "].json()["error"]["message"]
  assert post({"prompt": "w1", "model": "other"}).status_code == 404


def test_latency_budget_picks_the_largest_k_that_fits(served):
  from phds_jax.serve import api
  assert api.choose_k(1.0, {1: 0.0005, 2: 0.0008, 8: 0.002}, 8, (1, 2, 8)) == (2, True)
  assert api.choose_k(5.0, {1: 0.0005, 2: 0.0008, 8: 0.002}, 8, (1, 2, 8)) == (8, True)
  assert api.choose_k(0.1, {1: 0.0005, 2: 0.0008, 8: 0.002}, 8, (1, 2, 8)) == (1, False)
  url, state, _, _ = served
  reply = _client(url).completions.create(model="tiny", prompt="w1", max_tokens=2,
                                          extra_body={"latency_budget_ms": 1e6})
  assert reply.model_extra["phds"]["k"] == 8 and reply.model_extra["phds"]["latency_budget_met"]
  assert set(reply.model_extra["phds"]["decode_ms_per_token"]) == {"2", "8"}


def test_full_queue_answers_429_and_a_disconnect_frees_its_slot(served):
  import httpx
  url, state, _, _ = served
  bound = state.scheduler.max_waiting
  state.scheduler.max_waiting = 0
  try:
    reply = _http().post(url + "/v1/completions", json={"prompt": "w1"})
  finally:
    state.scheduler.max_waiting = bound
  assert reply.status_code == 429 and reply.headers["retry-after"] == "1"
  assert _metric(url, "phds_serve_rejected_total") >= 1
  cancelled = _metric(url, "phds_serve_requests_total", finish_reason="cancelled")
  with _http().stream("POST", url + "/v1/completions", json={"prompt": "w1", "max_tokens": 40, "stream": True,
                                                           "temperature": 0, "k": 1, "stop": ["never"]}) as r:
    next(r.iter_lines())  # the first chunk, then the client goes away
  deadline = time.monotonic() + 20
  while time.monotonic() < deadline and _metric(url, "phds_serve_requests_total", finish_reason="cancelled") == cancelled:
    time.sleep(0.05)
  assert _metric(url, "phds_serve_requests_total", finish_reason="cancelled") == cancelled + 1
  assert _metric(url, "phds_serve_slots_in_use", engine="plain") == 0
  # a non-streamed request whose client gives up is cancelled too (the server polls for the disconnect)
  engine = state.scheduler.engines["plain"]
  step = engine.generate
  engine.generate = lambda decode_state: (time.sleep(0.05), step(decode_state))[1]  # 40 tokens: 2 s
  try:
    with pytest.raises(httpx.TimeoutException):
      _http().post(url + "/v1/completions", timeout=0.3,
                 json={"prompt": "w1", "max_tokens": 40, "temperature": 0, "k": 1, "stop": ["never"]})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _metric(url, "phds_serve_requests_total",
                                                  finish_reason="cancelled") == cancelled + 1:
      time.sleep(0.05)
  finally:
    del engine.generate  # the class's method again
  assert _metric(url, "phds_serve_requests_total", finish_reason="cancelled") == cancelled + 2
  assert _metric(url, "phds_serve_slots_in_use", engine="plain") == 0


def test_an_api_key_guards_every_route_but_health(served):
  url, state, _, _ = served
  state.api_key = "s3cret"
  try:
    assert _http().get(url + "/health").status_code == 200
    for path in ("/v1/models", "/metrics", "/"):
      assert _http().get(url + path).status_code == 401
    assert _http().post(url + "/v1/completions", json={"prompt": "w1"}).status_code == 401
    assert _http().get(url + "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
  finally:
    state.api_key = ""


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_and_exits_zero(served, tmp_path):
  """The config entry point on 2 CPU devices (parameters sharded over fsdp=2): ready line; greedy output
  equal to the one-device server's; SIGTERM turns /health 503, refuses new requests, lets the in-flight
  stream finish, exits 0."""
  import httpx
  model_dir = tmp_path / "long"
  shutil.copytree(served[3], model_dir)
  config = json.loads((model_dir / "config.json").read_text())
  (model_dir / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
  port = _free_port()
  fields = dict(model_path=model_dir, compile_cache="", **{"mesh.data": 1, "mesh.fsdp": 2}, **{
      f"serve.{k}": v for k, v in dict(port=port, slots=2, roe_members=0, max_len=1024, max_tokens=1000,
                                       buckets="16", widths="8", timing_steps=1, drain_seconds=60).items()})
  env = dict(os.environ, PYTHONPATH=ROOT,
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2")
  proc = subprocess.Popen([sys.executable, "-m", "phds_jax.main", f"--config={ROOT}/configs/serve.py",
                           *[f"--config.{k}={v}" for k, v in fields.items()]],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
  url = f"http://127.0.0.1:{port}"
  try:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
      try:
        if _http().get(url + "/health").status_code == 200:
          break
      except httpx.TransportError:
        pass
      time.sleep(0.1)
    ask = {"prompt": "say first of : w3 w4", "max_tokens": 8, "temperature": 0, "k": 1}
    assert (_http().post(url + "/v1/completions", json=ask).json()["choices"][0]["text"] ==
            _http().post(served[0] + "/v1/completions", json=ask).json()["choices"][0]["text"])
    lines, reasons = [], []
    with _http().stream("POST", url + "/v1/completions", timeout=120, json={  # ~1000 decode steps: the drain waits
        "prompt": "w1", "max_tokens": 1000, "stream": True, "temperature": 0, "stop": ["never"]}) as r:
      for line in r.iter_lines():
        if not lines:
          proc.send_signal(signal.SIGTERM)
          while _http().get(url + "/health").status_code != 503:
            time.sleep(0.005)
          assert _http().get(url + "/health").json() == {"status": "draining"}
          assert _http().post(url + "/v1/completions", json={"prompt": "w1"}).status_code == 503
        lines.append(line)
        if line.startswith("data: {"):
          reasons.append(json.loads(line[6:])["choices"][0]["finish_reason"])
    assert "data: [DONE]" in lines
    assert reasons[-1] == "length"  # finished, not cut: well within the deadline
    out, _ = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, out
  assert "over 2 cpu device(s)" in out and "'fsdp': 2" in out
  assert "ready: http://127.0.0.1" in out and "SIGTERM: draining" in out and "Traceback" not in out


class _SlowEngine:
  """An engine stand-in for the scheduler's own logic: every step takes 20 ms and emits token 5."""

  slots, widths = 2, (1,)

  def __init__(self):
    self.busy_k = np.zeros((2, 1), np.int32)

  def init_decode_state(self):
    return {}

  def prefill(self, prompt, k):
    return None

  def insert(self, prefix, state, slot, last_token, settings):
    self.busy_k[slot] = 1
    return state

  def step_shape(self):
    return 1, 2

  def generate(self, state):
    from phds_jax.serve.engine import StepResult
    time.sleep(0.02)
    return state, StepResult(np.full(2, 5), np.zeros(2), np.zeros((2, 5), int), np.zeros((2, 5)))

  def free(self, slot):
    self.busy_k[slot] = 0


class _Tokenizer:
  def decode(self, ids, skip_special_tokens=True):
    return " ".join(f"w{i}" for i in ids)


def test_scheduler_bounds_its_queue_and_cuts_what_outlives_the_drain_deadline():
  from phds_jax.serve import scheduler as sched
  from phds_jax.serve.engine import SlotSettings
  from phds_jax.serve.metrics import ServeMetrics
  runner = sched.Scheduler({"plain": _SlowEngine()}, _Tokenizer(), max_waiting=1, metrics=ServeMetrics())
  runner.start()
  ends = []
  make = lambda n: sched.Request(prompt=[1, 2], max_tokens=n, settings=SlotSettings((1,)),
                                 emit=lambda e: ends.append(e) if "finish_reason" in e else None)
  short, long_ = make(20), make(10_000)
  for n, request in enumerate((short, long_), 1):
    runner.submit(request)
    while runner.slots_in_use() < n:
      time.sleep(0.005)
  runner.submit(make(1))  # waiting: both slots are busy
  with pytest.raises(sched.QueueFull):
    runner.submit(make(1))
  runner.drain(1.5)
  with pytest.raises(sched.NotAccepting):
    runner.submit(make(1))
  reasons = sorted(e["finish_reason"] for e in ends)
  assert reasons == ["length", "length", sched.SHUTDOWN]  # short and the waiting one finished; long was cut
  assert 0 < len(long_.tokens) < 10_000 and short.tokens == [5] * 20


def test_the_page_compares_k_in_a_real_browser(served):
  """Headless chromium: type a prompt, move the k dial, generate, compare at several k; the answers are the
  server's own."""
  if not shutil.which("chromium") and not shutil.which("chromium-browser"):
    pytest.fail("chromium is not installed: `apt-get install chromium chromium-driver` (.ci/run does)")
  from selenium import webdriver
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait
  url, state, _, _ = served
  options = webdriver.ChromeOptions()
  for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1100,760"):
    options.add_argument(flag)
  options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
  service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
  driver = webdriver.Chrome(options=options, service=service)
  try:
    driver.get(url + "/")
    wait = WebDriverWait(driver, 30)
    wait.until(lambda d: "experts" in d.find_element(By.ID, "model").text)
    prompt = driver.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("say first of : w3 w4")
    driver.execute_script("const k = document.getElementById('k'); k.value = 1;"
                          "k.dispatchEvent(new Event('input'));")
    assert driver.find_element(By.ID, "k-value").text == "1"
    driver.find_element(By.ID, "generate").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".answer[data-done]"))
    card = driver.find_element(By.CSS_SELECTOR, ".answer")
    expected = _client(url).completions.create(model="tiny", prompt="say first of : w3 w4", max_tokens=32,
                                               temperature=0, seed=0, extra_body={"k": 1}).choices[0].text
    assert card.find_element(By.CSS_SELECTOR, ".text").text == expected.strip()
    assert "tokens/s" in card.find_element(By.CSS_SELECTOR, ".stats").text
    driver.find_element(By.ID, "compare").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".answer[data-done='1']")) == 4)
    shown = [c.get_attribute("data-k") for c in driver.find_elements(By.CSS_SELECTOR, ".answer")]
    assert shown == ["1", "2", "4", "8"]
    if os.environ.get("PHDS_SCREENSHOT"):
      driver.save_screenshot(os.environ["PHDS_SCREENSHOT"])
  finally:
    driver.quit()


def test_serve_config_mistakes_are_one_line_each(served, tmp_path, monkeypatch):
  from phds_jax.cli import modes
  from phds_jax.cli.configs import serve_config
  monkeypatch.chdir(tmp_path)  # no built-in export here
  config = serve_config()
  assert config.model_path == ""
  assert modes.problems(config) == [modes.config_check.serve_problems(config)[0]]
  assert "configs/tiny.py" in modes.problems(config)[0]
  (tmp_path / "workdir" / "tiny" / "phds" / "hf_export").mkdir(parents=True)
  assert serve_config().model_path == "workdir/tiny/phds/hf_export"  # the built-in default's export, once it exists
  from phds_jax.cli import serve as serve_cli  # phds-serve: one flag per serve field
  flags = {a.dest for a in serve_cli.parser()._actions}
  assert set(config.serve) <= flags and serve_cli.parser().parse_args(["m", "--max-len=7"]).max_len == 7
  config = _serve_config(served[3], buckets="16,x", widths="2,4", k_max=9, max_len=100)
  config.serve.port = 70000
  found = modes.problems(config)
  for field in ("serve.port", "serve.buckets", "serve.k_max", "serve.max_len"):
    assert sum(line.startswith(field) for line in found) == 1, (field, found)
