"""Our parameters <-> Hugging Face tensors, through the model layout and the family's name templates.

Each parameter of `model.layout.param_layout(cfg)` is made of one HF tensor per decoder layer it stacks (or
one, unstacked), and per expert for the expert weights; the family module names them
(`Family.tensor_names`). One layer's slice differs from HF by the layout's `kind`:
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
  hf_names: tuple[tuple[str, ...], ...]  # per stacked layer (one entry when unstacked): one name, or one per expert


def param_specs(cfg: ModelConfig) -> list[Mapped]:
  """Every parameter of `cfg`'s model with its HF tensor names."""
  family = get_family(cfg.model_type)
  out = []
  for spec in param_layout(cfg):
    names = []
    for layer in spec.layers or (None,):
      if spec.kind == "experts":
        names.append(tuple(family.tensor_name(spec.role, layer, e) for e in range(cfg.num_experts)))
      else:
        names.append((family.tensor_name(spec.role, layer),))
    out.append(Mapped(spec, tuple(names)))
  return out


def hf_order(specs: list[Mapped]) -> list[tuple[Mapped, int, int]]:
  """(parameter, layer position, tensor index) of every HF tensor, in HF checkpoint order: embeddings,
  each decoder layer's tensors, final norm, head."""
  def key(item):
    m, j, _ = item
    return (m.spec.layers[j] if m.spec.layers else (-1 if m.spec.role == "embed" else 1 << 30))
  items = [(m, j, i) for m in specs for j, names in enumerate(m.hf_names) for i in range(len(names))]
  return sorted(items, key=key)  # stable: within a layer, the layout's order


def is_ignorable(name: str, cfg: ModelConfig) -> bool:
  """HF tensors that carry nothing we need: RoPE buffers, and lm_head when embeddings are tied."""
  return name.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and name == "lm_head.weight")


def read_block(mapped: Mapped, read: Callable[[str, Optional[tuple[slice, ...]]], np.ndarray],
               index: tuple[slice, ...]) -> np.ndarray:
  """The block `index` (one step-1 slice per dimension, in our layout) of `mapped`'s parameter, reading
  from each HF tensor only the block it contributes (`read(name, hf_index)`)."""
  if mapped.spec.layers:  # stacked: one layer's block at a time
    return np.stack([_read_layer_block(mapped.spec.kind, names, read, tuple(index[1:]))
                     for names in mapped.hf_names[index[0]]])
  return _read_layer_block(mapped.spec.kind, mapped.hf_names[0], read, tuple(index))


def _read_layer_block(kind: str, names: tuple[str, ...], read, index: tuple[slice, ...]) -> np.ndarray:
  if kind == "copy":
    return read(names[0], index)
  if kind == "linear":  # ours [in, out][i, o] = HF [out, in][o, i]
    return read(names[0], (index[1], index[0])).T
  # experts: ours [E, in, out][e, i, o] = HF_e [out, in][o, i]
  return np.stack([read(name, (index[2], index[1])).T for name in names[index[0]]])


def to_hf(mapped: Mapped, layer_slice: np.ndarray, index: int) -> np.ndarray:
  """The HF tensor number `index` (the expert index for "experts") of one layer's slice of our array."""
  kind = mapped.spec.kind
  if kind == "copy":
    return layer_slice
  if kind == "linear":
    return layer_slice.T
  return layer_slice[index].T
