"""lm-evaluation-harness adapter: the "phds_jax" model, with `k` as a model argument.

  phds-lm-eval --model phds_jax --model_args path=/ckpt/hf_export,k=4 --tasks arc_easy
  python -c "import phds_jax.eval.lm_eval_adapter, lm_eval; lm_eval.simple_evaluate(model='phds_jax', ...)"

Importing this module registers the model; `phds-lm-eval` is lm-eval's own command line with it
registered (lm-eval finds no models outside its package by itself). Model arguments: path (HF or orbax
checkpoint), k (declared top-k; default k_pre), dtype, batch_size, tokenizer (default: path),
max_gen_toks, expert_backend, and a Roster-of-Experts ensemble for every request type: roe_members
(default 1: none), roe_tau (a float, or one per MoE layer separated by ":"), roe_seed.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from phds_jax.data import pipeline as data_lib
from phds_jax.eval import scoring as evaluate
from phds_jax.eval.generate import generate
from phds_jax.io.load import load
from phds_jax.model.roe import RoE
from phds_jax.model.transformer import resolve_expert_backend


# what lm-eval itself passes to every model beside --model_args (create_from_arg_string's additional config)
_HARNESS_ARGS = ("device", "max_batch_size")


@register_model("phds_jax")
class PhdsLM(LM):
  """A phds_jax checkpoint served at a declared k."""

  def __init__(self, path: str, k: Optional[int] = None, dtype: str = "float32", batch_size: int = 16,
               tokenizer: Optional[str] = None, max_gen_toks: int = 256, expert_backend: str = "",
               roe_members: int = 1, roe_tau: Any = 0.0, roe_seed: int = 0, **unknown: Any):
    unknown = {k: v for k, v in unknown.items() if k not in _HARNESS_ARGS}
    if unknown:
      valid = [n for n in inspect.signature(PhdsLM.__init__).parameters if n not in ("self", "unknown")]
      raise ValueError(f"phds_jax model: unknown model argument(s) {sorted(unknown)}; valid ones are {valid}")
    super().__init__()
    self.cfg, self.params = load(path, dtype)
    self.expert_backend = resolve_expert_backend(expert_backend or "auto")
    self.k = int(k) if k not in (None, "") else self.cfg.k_pre
    if not 1 <= self.k <= self.cfg.num_experts:
      raise ValueError(f"k={self.k} must lie in [1, {self.cfg.num_experts}] for {path}")
    taus = tuple(float(t) for t in str(roe_tau).split(":"))
    roe = RoE(members=int(roe_members), tau=taus if len(taus) > 1 else taus[0], seed=int(roe_seed))
    roe.layer_taus(len(self.cfg.moe_layer_indices))  # a per-layer tau of the wrong length fails here
    self.roe = roe if roe.members > 1 else None
    self.tokenizer = data_lib.load_tokenizer(tokenizer or path)
    self.batch_size = int(batch_size)
    self.max_gen_toks = int(max_gen_toks)
    eot = self.tokenizer.eos_token_id
    self.prefix_token_id = eot if eot is not None else self.tokenizer.bos_token_id or 0

  def _encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=False)

  def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Tokens of (context, continuation), moving trailing spaces of the context into the continuation."""
    stripped = context.rstrip(" ")
    continuation = context[len(stripped):] + continuation
    whole, head = self._encode(stripped + continuation), self._encode(stripped)
    head = head or [self.prefix_token_id]
    return (head, whole[len(head):]) if whole[:len(head)] == head else (head, self._encode(continuation))

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    pairs = [self._split(*r.args) for r in requests]
    scores, greedy = evaluate.continuation_logprobs(self.cfg, self.params, pairs, k=self.k,
                                                    batch_size=self.batch_size, return_greedy=True,
                                                    expert_backend=self.expert_backend, roe=self.roe)
    return [(float(s), bool(g)) for s, g in zip(scores, greedy)]

  def loglikelihood_rolling(self, requests) -> list[float]:
    out = []
    for request in requests:
      windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
          self._encode(request.args[0]), self.prefix_token_id, self.cfg.max_position_embeddings, 1)]
      scores = evaluate.continuation_logprobs(self.cfg, self.params, windows, k=self.k,
                                              batch_size=self.batch_size, expert_backend=self.expert_backend,
                                              roe=self.roe) if windows else []
      out.append(float(sum(scores)))
    return out

  def generate_until(self, requests) -> list[str]:
    out = []
    for request in requests:
      context, kwargs = request.args
      kwargs = dict(kwargs or {})
      until = kwargs.pop("until", None) or []
      until = [until] if isinstance(until, str) else list(until)
      max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
      temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
      prompt = self._encode(context) or [self.prefix_token_id]
      (new,) = generate(self.cfg, self.params, [prompt], max_new_tokens=max_new, k=self.k,
                        temperature=temperature, top_p=float(kwargs.pop("top_p", 1.0) or 1.0),
                        expert_backend=self.expert_backend, roe=self.roe)
      text = self.tokenizer.decode(new, skip_special_tokens=True)
      for stop in until:
        if stop and stop in text:
          text = text[:text.index(stop)]
      out.append(text)
    return out


def cli():
  """lm-eval's command line with the phds_jax model registered."""
  from lm_eval.__main__ import cli_evaluate  # pylint: disable=g-import-not-at-top

  cli_evaluate()
