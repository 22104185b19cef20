"""The server's Prometheus metrics (one registry per server, served at GET /metrics)."""

from __future__ import annotations

import prometheus_client as prom

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class ServeMetrics:
  """Counters, gauges and histograms named phds_serve_*."""

  def __init__(self):
    self.registry = r = prom.CollectorRegistry()
    self.requests = prom.Counter("phds_serve_requests", "Finished requests by finish reason",
                                 ["finish_reason"], registry=r)
    self.rejected = prom.Counter("phds_serve_rejected", "Requests refused with 429 (waiting queue full)",
                                 registry=r)
    self.errors = prom.Counter("phds_serve_bad_requests", "Requests refused with 4xx by field", ["param"],
                               registry=r)
    self.requests_by_k = prom.Counter("phds_serve_requests_by_k", "Admitted requests by their largest k",
                                      ["k"], registry=r)
    self.prompt_tokens = prom.Counter("phds_serve_prompt_tokens", "Prompt tokens of finished requests",
                                      registry=r)
    self.generated_tokens = prom.Counter("phds_serve_generation_tokens", "Generated tokens", registry=r)
    self.waiting = prom.Gauge("phds_serve_requests_waiting", "Requests in the waiting queue", registry=r)
    self.slots_in_use = prom.Gauge("phds_serve_slots_in_use", "Busy decode slots", ["engine"], registry=r)
    self.slots_total = prom.Gauge("phds_serve_slots", "Decode slots", ["engine"], registry=r)
    self.programs = prom.Gauge("phds_serve_compiled_programs",
                               "Compiled programs (prefill, insert, decode steps); flat after warm-up", registry=r)
    self.step_seconds = prom.Gauge("phds_serve_decode_step_seconds",
                                   "Decode step time by expert width (moving average)", ["width"], registry=r)
    self.queue_seconds = prom.Histogram("phds_serve_queue_seconds", "Time from arrival to a decode slot",
                                        buckets=_LATENCY_BUCKETS, registry=r)
    self.ttft = prom.Histogram("phds_serve_time_to_first_token_seconds", "Time to first token",
                               buckets=_LATENCY_BUCKETS, registry=r)
    self.tpot = prom.Histogram("phds_serve_time_per_output_token_seconds",
                               "Time per output token after the first", buckets=_LATENCY_BUCKETS, registry=r)
    self.e2e_seconds = prom.Histogram("phds_serve_e2e_request_seconds", "Arrival to last token",
                                      buckets=_LATENCY_BUCKETS, registry=r)

  def text(self) -> bytes:
    return prom.generate_latest(self.registry)
