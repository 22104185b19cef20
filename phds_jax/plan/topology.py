"""Cloud TPU slices: names, chips, HBM and peak figures, and their devices for ahead-of-time compilation.

No heavy imports: the launcher and the config checks read slice names through this module.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from phds_jax import platforms
from phds_jax.errors import PlanDoesNotFitError

GIB = 2**30


class Chip(NamedTuple):
  """One TPU generation's public figures (Cloud TPU documentation)."""

  hbm_gib: float  # HBM per chip
  peak_tflops: float  # dense bf16 peak per chip
  hbm_gbps: float  # HBM bandwidth per chip, GB/s
  name_counts: str  # what the number in a slice name counts: "chips" or "cores" (2 TensorCores per chip)
  shapes: dict[int, str]  # chips -> topology (as jax.experimental.topologies names it)
  ici_gbps: float  # inter-chip interconnect bandwidth per chip, Gbit/s one way over all ports, as documented
  #                  (v5e: 1600 Gbps, which the same page gives as 400 GB/s bidirectional)


_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
       512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
CHIPS = {
    "v4": Chip(32, 275, 1228, "cores", _3D, 2400),
    "v5e": Chip(16, 197, 819, "chips", _2D, 1600),
    "v5p": Chip(95, 459, 2765, "cores", _3D, 4800),
    "v6e": Chip(32, 918, 1640, "chips", _2D, 3584),
}


def ici_bytes_per_s(chip: Chip) -> float:
  """Bytes per second a chip's ICI moves in both directions together (the optimistic collective bound)."""
  return 2 * chip.ici_gbps * 1e9 / 8
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}


class SliceSpec(NamedTuple):
  name: str  # as given, e.g. "v5e-16"
  generation: str  # key of CHIPS
  chips: int  # per slice
  topology: str  # e.g. "v5e:4x4"
  num_slices: int

  @property
  def chip(self) -> Chip:
    return CHIPS[self.generation]


def parse_slice(name: str, num_slices: int = 1) -> SliceSpec:
  """"v5e-16" (or "v5litepod-16", "v4-32", "v5p-32", "v6e-8") -> SliceSpec; ValueError naming the choices."""
  match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name.strip().lower())
  generation = _ALIASES.get(match.group(1), match.group(1)) if match else None
  if generation not in CHIPS:
    raise ValueError(f"compile_topology={name!r}: expected a Cloud TPU slice name such as v5e-16, v4-32, "
                     f"v5p-32 or v6e-8 (generations {', '.join(CHIPS)})")
  count, chip = int(match.group(2)), CHIPS[generation]
  chips = count // 2 if chip.name_counts == "cores" else count
  if chips not in chip.shapes or (chip.name_counts == "cores" and count % 2):
    sizes = sorted(c * (2 if chip.name_counts == "cores" else 1) for c in chip.shapes)
    raise ValueError(f"compile_topology={name!r}: {generation} slices come in sizes {sizes}")
  if num_slices < 1:
    raise ValueError(f"compile_num_slices={num_slices} must be >= 1")
  return SliceSpec(name, generation, chips, f"{generation}:{chip.shapes[chips]}", num_slices)


def topology_devices(spec: SliceSpec) -> list[Any]:
  """The slice's devices (all slices), described by libtpu for ahead-of-time compilation."""
  platforms.prepare_compile_only_tpu()
  try:
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    kwargs = {"num_slices": spec.num_slices} if spec.num_slices > 1 else {}
    return list(topologies.get_topology_desc(topology_name=spec.topology, platform="tpu", **kwargs).devices)
  except (ImportError, RuntimeError) as e:
    if "libtpu" in str(e).lower() or "tpu" in str(e).lower():
      raise PlanDoesNotFitError(f"cannot describe {spec.name}: TPU compilation needs libtpu; install it with "
                                f'pip install -e ".[tpu]" ({e})') from None
    raise
