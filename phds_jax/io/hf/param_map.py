"""Our parameters <-> Hugging Face tensors, through the model layout and the family's name templates.

Each parameter of `model.layout.param_layout(cfg)` is made of one HF tensor, or one per expert for the
stacked expert weights; the family module names them (`Family.tensor_names`). The layout's `kind` says
how the layouts differ:
  - "copy":    identical (norm scales, biases, the embedding);
  - "linear":  ours [in, out] = HF Linear weight [out, in] transposed;
  - "experts": ours [E, in, out] = stack over e of HF per-expert weights [out, in] transposed.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import numpy as np

from phds_jax.model.config import ModelConfig
from phds_jax.model.families import get_family
from phds_jax.model.layout import ParamSpec, param_layout


class Mapped(NamedTuple):
  spec: ParamSpec
  hf_names: tuple[str, ...]  # one name, or one per expert for kind "experts"


def param_specs(cfg: ModelConfig) -> list[Mapped]:
  """Every parameter of `cfg`'s model with its HF tensor name(s), in HF checkpoint order."""
  family = get_family(cfg.model_type)
  out = []
  for spec in param_layout(cfg):
    if spec.kind == "experts":
      names = tuple(family.tensor_name(spec.role, spec.layer, e) for e in range(cfg.num_experts))
    else:
      names = (family.tensor_name(spec.role, spec.layer),)
    out.append(Mapped(spec, names))
  return out


def is_ignorable(name: str, cfg: ModelConfig) -> bool:
  """HF tensors that carry nothing we need: RoPE buffers, and lm_head when embeddings are tied."""
  return name.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and name == "lm_head.weight")


def read_block(mapped: Mapped, read: Callable[[str, Optional[tuple[slice, ...]]], np.ndarray],
               index: tuple[slice, ...]) -> np.ndarray:
  """The block `index` (one step-1 slice per dimension, in our layout) of `mapped`'s parameter, reading
  from each HF tensor only the block it contributes (`read(name, hf_index)`)."""
  kind = mapped.spec.kind
  if kind == "copy":
    return read(mapped.hf_names[0], tuple(index))
  if kind == "linear":  # ours [in, out][i, o] = HF [out, in][o, i]
    return read(mapped.hf_names[0], (index[1], index[0])).T
  names = mapped.hf_names[index[0]]  # experts: ours [E, in, out][e, i, o] = HF_e [out, in][o, i]
  return np.stack([read(name, (index[2], index[1])).T for name in names])


def to_hf(mapped: Mapped, ours: np.ndarray, index: int) -> np.ndarray:
  """The HF tensor number `index` of `mapped` (the expert index for "experts") from our array."""
  kind = mapped.spec.kind
  if kind == "copy":
    return ours
  if kind == "linear":
    return ours.T
  return ours[index].T
