"""Ahead-of-time memory plans for TPU slices: will this training config fit, and how fast can it be?

`python -m phds_jax.main --config=configs/olmoe.py --config.compile_topology=v5e-16` runs on any machine,
CPU included (with libtpu installed: `pip install -e ".[tpu]"`). It describes the slice's devices
(`jax.experimental.topologies`), builds the abstract train state from the config (shapes only: no weight
is read), compiles the real programs for those devices and the config's mesh, and prints per device:

  - the train step at the config's k mode (traced: one program for every k; static: the largest k),
  - the validation step as training runs it (the train state stays resident beside it),
  - generation (prefill + KV-cached decoding at k_pre) as the eval job runs it on the trained model;

each with parameters, optimizer state, gradients, activations / temporaries and the total against the
chip's HBM, plus model FLOPs per step, collective bytes per step and a roofline lower bound of the step
time. A plan that does not fit raises PlanDoesNotFitError naming the largest consumer (exit status 1).
Slice names are Cloud TPU's: `v4-32` and `v5p-32` count TensorCores (2 per chip), `v5e-16` and `v6e-8`
count chips.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, NamedTuple, Optional

import numpy as np

from phds_jax.errors import ConfigProblems, PlanDoesNotFitError
from phds_jax.io import files
from phds_jax.plan.cost import dispatch_bytes, forward_flops_per_token
from phds_jax.plan.topology import GIB, ici_bytes_per_s, parse_slice, topology_devices


def _bytes(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest share)."""
  import jax  # pylint: disable=g-import-not-at-top

  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
  return total


_COLLECTIVE = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(ragged-all-to-all|all-gather|all-reduce|reduce-scatter|"
                         r"all-to-all|collective-permute)(?:-start)?\(")
_SHAPE = re.compile(r"(pred|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|u64|f64)\[([\d,]*)\]")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
             "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_COMPUTATION = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s+->\s+.*\{\s*$")
_WHILE_BODY = re.compile(r"\swhile\(.*\bbody=%?([\w.\-]+)")
_WHILE_CONDITION = re.compile(r"\bcondition=%?([\w.\-]+)")
_CONSTANT = re.compile(r"^\s*%?([\w.\-]+)\s*=\s*s(?:32|64)\[\]\S*\s+constant\((\d+)\)")
_LESS_THAN = re.compile(r"^\s*ROOT\s.*\scompare\(%?[\w.\-]+,\s*%?([\w.\-]+)\),\s*direction=LT")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CALLED = re.compile(r"\b(?:calls|to_apply|branch_computations|true_computation|false_computation)=\{?%?([\w.\-, %]+)\}?")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# XLA TPU's async collective fusion splits one collective into a start (flag_start -1) and continuations
# fused into the compute they overlap; every part repeats the whole collective's shape and channel
_CONTINUATION = re.compile(r'"async_collective_fusion_config":\{"flag_start":"\d+"')


_DEFINITION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(?:pred|[a-z]+\d+)\[([\d,]*)\]")
_MATMUL = re.compile(r"=\s*\S+\s+(dot|convolution)\(([^)]*)\)")
_LHS_CONTRACTING = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")
_DIM_LABELS = re.compile(r"dim_labels=\w+_(\w+)->")
_VALUE = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*((?:pred|[a-z]+\d+)\[[\d,]*\])\S*\s+([\w\-]+)\(")
_FUSION_CALL = re.compile(r"\sfusion\(.*\bcalls=%?([\w.\-]+)")
# ops whose result is no new buffer (views, plumbing) or is counted elsewhere (parameters)
_NOT_BUFFERS = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "conditional", "call",
                "after-all", "partition-id", "replica-id", "copy-done", "all-gather-done", "all-reduce-done",
                "collective-permute-done"}


class CollectiveOp(NamedTuple):
  kind: str
  op_name: str  # the JAX operation it came from (HLO metadata), or the HLO instruction's name
  bytes: int  # result bytes per device per execution
  executions: int  # per call of the program: the trip counts of the loops around it multiplied


def _line_bytes(types: str) -> int:
  shapes = _SHAPE.findall(types)
  if types.startswith("(") and len(shapes) > 1:  # async start: (operand, result, ...) -> result
    shapes = shapes[1:2]
  return sum(_ITEMSIZE[t] * int(np.prod([int(d) for d in dims.split(",") if d])) for t, dims in shapes)


def _dims(text: str) -> list[int]:
  return [int(d) for d in text.split(",") if d]


class _Hlo(NamedTuple):
  """A compiled module read once: what each computation does itself, and whom it calls how often."""

  collectives: dict[str, list[tuple[str, str, int]]]  # computation -> (kind, op name, bytes)
  flops: dict[str, float]  # computation -> FLOPs of its own dots and convolutions, once
  values: list[tuple[int, str]]  # (bytes, op name) of every array value outside fused computations
  executions: dict[str, int]  # computation -> executions per call of the entry (loops multiplied)


def _matmul_flops(line: str, kind: str, operands: str, shapes: dict[str, list[int]]) -> float:
  """2 x multiply-adds of one dot / convolution line (operand shapes inline or defined earlier)."""
  result = _DEFINITION.match(line)
  if not result:
    return 0.0
  def operand_dims(text):
    inline = _SHAPE.search(text)
    return _dims(inline.group(2)) if inline else shapes.get(text.strip().lstrip("%"), [])
  parts = [p for p in operands.split(", ") if p.strip()]
  if len(parts) < 2:
    return 0.0
  lhs, rhs = operand_dims(parts[0]), operand_dims(parts[1])
  if kind == "dot":
    contracting = _LHS_CONTRACTING.search(line)
    reduced = np.prod([lhs[d] for d in _dims(contracting.group(1))]) if contracting and lhs else 1
  else:  # each output element reduces over the kernel's dims but its output features
    labels = _DIM_LABELS.search(line)
    reduced = (np.prod([n for n, label in zip(rhs, labels.group(1)) if label != "o"])
               if labels and len(labels.group(1)) == len(rhs) else 1)
  return 2.0 * float(np.prod(_dims(result.group(2)))) * float(reduced)


def _read_hlo(hlo_text: str) -> _Hlo:
  """Reads a compiled program's HLO (see `collective_ops` for how loops are counted)."""
  collectives: dict[str, list] = {}
  flops: dict[str, float] = {}
  shapes: dict[str, list[int]] = {}
  calls: dict[str, list[tuple[str, object]]] = {}  # callee, trip count (an int, or the condition's name)
  bounds: dict[str, int] = {}  # loop condition -> N of its `counter < N` (the scan counters start at 0)
  constants: dict[str, int] = {}
  values: dict[str, list[tuple[int, str]]] = {}
  fused: set[str] = set()
  entry, current = "", ""
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = header.group(2)
      entry = current if header.group(1) else entry
      continue
    definition = _DEFINITION.match(line)
    if definition:
      shapes[definition.group(1)] = _dims(definition.group(2))
    constant = _CONSTANT.match(line)
    if constant:
      constants[constant.group(1)] = int(constant.group(2))
    less = _LESS_THAN.match(line)
    if less and less.group(1) in constants:
      bounds[current] = constants[less.group(1)]
    value = _VALUE.match(line)
    if value and value.group(2) not in _NOT_BUFFERS:
      name = _OP_NAME.search(line)
      values.setdefault(current, []).append((_line_bytes(value.group(1)), name.group(1) if name else value.group(2)))
    fusion = _FUSION_CALL.search(line)
    if fusion:
      fused.add(fusion.group(1))
    matmul = _MATMUL.search(line)
    if matmul:
      flops[current] = flops.get(current, 0.0) + _matmul_flops(line, matmul.group(1), matmul.group(2), shapes)
    match = _COLLECTIVE.search(line)
    if match and "-done" not in line.split("=")[1][:40] and not _CONTINUATION.search(line):
      name = _OP_NAME.search(line)
      instruction = line.split("=")[0].strip().lstrip("%")
      collectives.setdefault(current, []).append((match.group(2), name.group(1) if name else instruction,
                                                  _line_bytes(match.group(1))))
    body = _WHILE_BODY.search(line)
    if body:
      trips = _TRIP_COUNT.search(line)
      condition = _WHILE_CONDITION.search(line)
      calls.setdefault(current, []).append(
          (body.group(1), int(trips.group(1)) if trips else condition.group(1) if condition else 1))
    for called in _CALLED.findall(line):
      for callee in (c.strip().lstrip("%") for c in called.split(",")):
        if callee:
          calls.setdefault(current, []).append((callee, 1))
  executions: dict[str, int] = {}

  def visit(computation: str, count: int, depth: int = 0) -> None:
    if depth > 64:
      return
    executions[computation] = executions.get(computation, 0) + count
    for callee, trips in calls.get(computation, []):
      visit(callee, count * (trips if isinstance(trips, int) else bounds.get(trips, 1)), depth + 1)

  visit(entry if entry else "", 1)
  return _Hlo(collectives, flops, [v for c, vs in values.items() if c not in fused for v in vs], executions)


def collective_ops(hlo_text: str) -> list[CollectiveOp]:
  """Every collective of a compiled program's HLO with how often one call executes it: an op inside a
  `while` body counts its loop's trip count (nested loops multiply): XLA's `known_trip_count` where it
  states one (CPU), else N when the loop's condition is `counter < constant N` (TPU programs state no
  count; JAX's loop counters start at 0); any other loop counts once. A collective XLA split into a start
  and continuations (TPU's async collective fusion) counts once, as its start. Text without computation
  headers is read as one entry computation."""
  return _collective_ops(_read_hlo(hlo_text))


def _collective_ops(hlo: _Hlo) -> list[CollectiveOp]:
  return [CollectiveOp(kind, name, size, count) for computation, count in hlo.executions.items()
          for kind, name, size in hlo.collectives.get(computation, [])]


def matmul_flops(hlo_text: str) -> float:
  """FLOPs per call of a compiled program's dots and convolutions (2 per multiply-add), each counted once
  per execution: loops multiplied by their trip counts as in `collective_ops` (XLA's own cost analysis
  counts a loop body once). Elementwise work is not counted."""
  return _matmul_flops_of(_read_hlo(hlo_text))


def _matmul_flops_of(hlo: _Hlo) -> float:
  return sum(hlo.flops.get(computation, 0.0) * count for computation, count in hlo.executions.items())


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """Result bytes per device of each collective kind per call of a compiled program, ops inside loops
  counted once per iteration (`collective_ops`)."""
  return _bytes_by_kind(collective_ops(hlo_text))


def _bytes_by_kind(ops: list[CollectiveOp]) -> dict[str, int]:
  out: dict[str, int] = {}
  for op in ops:
    out[op.kind] = out.get(op.kind, 0) + op.bytes * op.executions
  return out


def top_collectives(ops: list[CollectiveOp], n: int = 3) -> list[tuple[str, str, int, int]]:
  """The `n` collectives of `ops` (`collective_ops`) moving the most bytes per call: (kind, JAX op name,
  bytes per call, executions)."""
  merged: dict[tuple[str, str], list[int]] = {}
  for op in ops:
    entry = merged.setdefault((op.kind, op.op_name), [0, 0])
    entry[0] += op.bytes * op.executions
    entry[1] += op.executions
  ranked = sorted(merged.items(), key=lambda item: -item[1][0])[:n]
  return [(kind, name, total, count) for (kind, name), (total, count) in ranked]


def largest_values(hlo_text: str, n: int = 3) -> list[tuple[int, str]]:
  """The `n` largest array values a compiled program makes (bytes per device, the JAX op it came from),
  outside fused computations: what its temporaries are made of. A value inside a loop is one buffer, reused
  by every iteration."""
  return _largest_values(_read_hlo(hlo_text), n)


def _largest_values(hlo: _Hlo, n: int) -> list[tuple[int, str]]:
  return sorted(hlo.values, key=lambda v: -v[0])[:n]


def _hlo_counts(compiled) -> dict[str, Any]:
  """A compiled program's figures for its Program (its HLO read once): loop-counted collective bytes per
  kind, the largest three collectives, the dot / convolution FLOPs, and the largest three values."""
  hlo = _read_hlo(compiled.as_text())
  ops = _collective_ops(hlo)
  return {"collectives": _bytes_by_kind(ops), "top_collectives": tuple(top_collectives(ops)),
          "hlo_flops": _matmul_flops_of(hlo), "largest_values": tuple(_largest_values(hlo, 3))}


# ---- the programs ----------------------------------------------------------------------------------------


class Program(NamedTuple):
  name: str
  rows: dict[str, int]  # consumer -> bytes per device
  total: int
  flops: float  # model FLOPs per device per call
  min_bytes: float  # HBM bytes a call must at least move per device
  collectives: dict[str, int]  # kind -> result bytes per device per call, loops counted per iteration
  hlo_flops: float  # the compiled program's dot / convolution FLOPs per device per call, loops counted
  note: str
  top_collectives: tuple = ()  # (kind, JAX op name, bytes per call, executions) of the largest three
  largest_values: tuple = ()  # (bytes, JAX op name) of the three largest values: what temporaries hold
  dispatch: Optional[dict] = None  # expert parallelism: cost.dispatch_bytes per MoE layer forward, and its inputs


def _dispatch(trainer, cfg, config, tokens: int, width: int) -> Optional[dict]:
  """The token dispatch's bytes per MoE layer forward when the mesh shards experts (cost.dispatch_bytes),
  with the group size, tokens per device and the dispatch in use; None without expert parallelism."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from phds_jax.model import sharding as sharding_lib  # pylint: disable=g-import-not-at-top

  shape = dict(trainer.mesh.shape)
  rules = sharding_lib.parse_rules(dict(config.axis_rules))
  group = int(np.prod([shape.get(a, 1) for a in rules["exp"]]))
  if group <= 1:
    return None
  local = tokens / int(np.prod([shape.get(a, 1) for a in rules["batch"]]))
  itemsize = jnp.dtype(config.train.compute_dtype).itemsize
  return {"dispatch": config.model.expert_dispatch, "group": group, "tokens_per_device": local, "width": width,
          **dispatch_bytes(local, width, cfg.hidden_size, group, itemsize)}


def _train_program(trainer, cfg, config, state, devices: int) -> Program:
  from phds_jax.eval import settings  # pylint: disable=g-import-not-at-top

  batch, seq = config.train.batch_size, config.data.seq_len
  abstract_batch = _abstract_rows(trainer, batch, seq)
  k_max = max(settings.parse_numbers(config.phds.k_values)) if config.phds.enabled else cfg.k_pre
  k = [k_max] * config.train.grad_accum if config.phds.k_per_microbatch else k_max
  compiled = trainer.compiled_train_step(state, abstract_batch, k)
  mem = compiled.memory_analysis()
  params = _bytes(state["trainable"]) + _bytes(state["frozen"])
  grads = _bytes(state["trainable"])
  width = max(k_max, cfg.k_pre) if config.phds.mask == "soft" else k_max
  tokens = batch * seq
  passes = 4 if config.train.remat == "full" else 3  # forward + backward (2x); full remat: one more forward
  flops = passes * forward_flops_per_token(cfg, width, (seq + 1) / 2) * tokens / devices
  temporaries = int(mem.temp_size_in_bytes)
  rows = {"parameters": params, "optimizer state": _bytes(state["opt_state"]),
          "gradients": min(grads, temporaries), "activations / temporaries": max(temporaries - grads, 0),
          "batch, outputs, code": _io_bytes(mem, state_bytes=_bytes(state)) + int(mem.generated_code_size_in_bytes)}
  mode = "traced k" if config.phds.k_mode == "traced" else f"static k={k_max}"
  micro_tokens = tokens // config.train.grad_accum
  return Program("train step", rows, sum(rows.values()), flops, 2 * _bytes(state),
                 dispatch=_dispatch(trainer, cfg, config, micro_tokens, width),
                 note=f"{batch} x {seq} tokens, {mode}, {width} experts computed, remat={config.train.remat}, "
                 f"grad_accum={config.train.grad_accum}",
                 **_hlo_counts(compiled))


def _abstract_rows(trainer, batch: int, seq: int) -> dict[str, Any]:
  """A batch of packed rows [batch, seq] (data.ROW_KEYS) as ShapeDtypeStructs sharded over the batch axes."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from phds_jax.data import pipeline as data_lib  # pylint: disable=g-import-not-at-top
  from phds_jax.model import sharding as sharding_lib  # pylint: disable=g-import-not-at-top

  with trainer.context():
    row_sharding = sharding_lib.batch_sharding(trainer.mesh, 2, shape=(batch, seq))
  return {key: jax.ShapeDtypeStruct((batch, seq), jnp.float32 if key == "weights" else jnp.int32,
                                    sharding=row_sharding) for key in data_lib.ROW_KEYS}


def _io_bytes(mem, state_bytes: int) -> int:
  """Argument and output bytes beyond the (donated, aliased) state."""
  return max(int(mem.argument_size_in_bytes) - state_bytes, 0) + max(
      int(mem.output_size_in_bytes) - int(mem.alias_size_in_bytes), 0)


def _params_like(state, dtype) -> Any:
  """Abstract full parameters (trainable and frozen merged) in `dtype`, sharded like the state's."""
  import jax  # pylint: disable=g-import-not-at-top
  from phds_jax.train import loop as train  # pylint: disable=g-import-not-at-top

  merged = train.merge_params(state["trainable"], state["frozen"])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding), merged)


def _eval_program(trainer, cfg, config, state, devices: int) -> Program:
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from phds_jax.eval import scoring as evaluate  # pylint: disable=g-import-not-at-top
  from phds_jax.model import losses  # pylint: disable=g-import-not-at-top

  batch, seq = config.eval.batch_size, config.data.seq_len
  params = _params_like(state, jnp.dtype(config.train.compute_dtype))
  abstract_batch = _abstract_rows(trainer, batch, seq)
  with trainer.context():
    run = losses.RunSpec(cfg.k_pre, max_loss_tokens=config.data.max_loss_tokens,
                         expert_backend=trainer.expert_backend)
    compiled = evaluate._nll_batch.lower(cfg, params, abstract_batch, run).compile()  # pylint: disable=protected-access
  mem = compiled.memory_analysis()
  rows = {"parameters": _bytes(state["trainable"]) + _bytes(state["frozen"]) + _bytes(params),
          "optimizer state": _bytes(state["opt_state"]), "gradients": 0,
          "activations / temporaries": int(mem.temp_size_in_bytes),
          "batch, outputs, code": _io_bytes(mem, _bytes(params)) + int(mem.generated_code_size_in_bytes)}
  flops = forward_flops_per_token(cfg, cfg.k_pre, (seq + 1) / 2) * batch * seq / devices
  return Program("validation step", rows, sum(rows.values()), flops, _bytes(params),
                 dispatch=_dispatch(trainer, cfg, config, batch * seq, cfg.k_pre),
                 note=f"{batch} x {seq} tokens at k_pre={cfg.k_pre}, beside the resident train state and a "
                 f"{config.train.compute_dtype} copy of the parameters",
                 **_hlo_counts(compiled))


def _generate_program(trainer, cfg, config, state, devices: int) -> Program:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from phds_jax.eval.generate import generation_program as generation  # pylint: disable=g-import-not-at-top
  from phds_jax.model import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from phds_jax.model.transformer import plan_k  # pylint: disable=g-import-not-at-top

  lat = config.eval.latency
  batch, prompt, new = lat.batch_size, lat.prompt_len, lat.decode_tokens
  params = _params_like(state, jnp.dtype(config.model.param_dtype))
  plan = plan_k(cfg, None, None, None, batch)
  key_dtype = jax.eval_shape(lambda: jax.random.key(0)).dtype
  with trainer.context():
    repl = sharding_lib.replicated(trainer.mesh)
    rows_sh = sharding_lib.batch_sharding(trainer.mesh, 2, shape=(batch, prompt))
    args = (params, jax.ShapeDtypeStruct((batch, prompt), jnp.int32, sharding=rows_sh),
            jax.ShapeDtypeStruct((batch, prompt), jnp.bool_, sharding=rows_sh), None,
            jax.ShapeDtypeStruct((), key_dtype, sharding=repl),
            jax.ShapeDtypeStruct((), jnp.int32, sharding=repl), None, None,  # no routing ensemble
            jax.ShapeDtypeStruct((), jnp.float32, sharding=repl), jax.ShapeDtypeStruct((), jnp.float32, sharding=repl))
    compiled = generation.lower(
        *args, cfg=cfg, layer_k=plan.static, layer_width=plan.widths, max_new=new, stop_ids=(),
        expert_backend=trainer.expert_backend).compile()
  mem = compiled.memory_analysis()
  rows = {"parameters": _bytes(params), "optimizer state": 0, "gradients": 0,
          "activations / temporaries": int(mem.temp_size_in_bytes),
          "batch, outputs, code": _io_bytes(mem, _bytes(params)) + int(mem.generated_code_size_in_bytes)}
  tokens = batch * (prompt + new)
  flops = forward_flops_per_token(cfg, cfg.k_pre, prompt + new / 2) * tokens / devices
  # the HBM bound: every parameter read once per call (each decoded token reads its experts' again)
  return Program("generation", rows, sum(rows.values()), flops, _bytes(params) * 1.0,
                 note=f"{batch} x ({prompt} prompt + {new} new) tokens at k_pre={cfg.k_pre}, "
                 f"{config.model.param_dtype} parameters (the eval job's settings: eval.latency)",
                 **_hlo_counts(compiled))


# ---- the plan --------------------------------------------------------------------------------------------


def build(config) -> dict[str, Any]:
  """Compiles the config's programs for `config.compile_topology` and returns the plan (see module doc)."""
  import jax  # pylint: disable=g-import-not-at-top
  from phds_jax.model import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from phds_jax.train import loop as train  # pylint: disable=g-import-not-at-top
  from phds_jax.model.transformer import init_params  # pylint: disable=g-import-not-at-top

  spec = parse_slice(config.compile_topology, config.compile_num_slices)
  devices = topology_devices(spec)
  problems = sharding_lib.mesh_and_batch_problems(config, len(devices), spec.num_slices,
                                                  len({d.process_index for d in devices}))
  if problems:
    raise ConfigProblems(f"the config on {spec.name}", problems)
  from phds_jax.io import load as load_lib  # pylint: disable=g-import-not-at-top

  cfg = load_lib.run_model_config(config)
  mesh = sharding_lib.make_mesh(dict(config.mesh), devices)
  trainer = train.Trainer(cfg, config, mesh, config.train.steps)
  abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), dtype=config.model.param_dtype))
  trainable = train.trainable_paths(cfg, abstract, config.train.trainable)
  state = trainer.abstract_init(abstract, trainable)
  chip = spec.chip
  hbm_per_device = int(chip.hbm_gib * GIB * spec.chips * spec.num_slices / len(devices))
  peak = chip.peak_tflops * 1e12 * spec.chips * spec.num_slices / len(devices)
  bandwidth = chip.hbm_gbps * 1e9 * spec.chips * spec.num_slices / len(devices)
  per_chip = spec.chips * spec.num_slices / len(devices)  # chips per device (1, or 1/2 for v4/v5p cores)
  programs = []
  for name, make in (("train step", _train_program), ("validation step", _eval_program),
                     ("generation", _generate_program)):
    _say(f"compiling the {name} for {spec.name}{f' x {spec.num_slices}' if spec.num_slices > 1 else ''} ...")
    try:
      programs.append(make(trainer, cfg, config, state, len(devices)))
    except Exception as e:  # pylint: disable=broad-except  (XLA reports an HBM overflow as a runtime error)
      if "RESOURCE_EXHAUSTED" not in str(e) and "HbmOom" not in str(e):
        raise
      programs.append(_overflow(name, str(e)))
  return {"slice": spec.name, "num_slices": spec.num_slices, "topology": spec.topology,
          "devices": len(devices), "hosts": len({d.process_index for d in devices}),
          "mesh": {k: int(v) for k, v in mesh.shape.items()}, "model": cfg.model_type,
          "parameters": int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract))),
          "hbm_per_device": hbm_per_device, "peak_flops_per_device": peak, "hbm_bandwidth_per_device": bandwidth,
          "ici_bandwidth_per_device": ici_bytes_per_s(chip) * per_chip,
          "programs": [p._asdict() for p in programs]}


def _overflow(name: str, message: str) -> Program:
  """A program XLA refused to place: what it says it needed."""
  needed = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT])\)", message)
  total = int(float(needed.group(1)) * 1024 ** "KMGT".index(needed.group(2)) * 1024) if needed else -1
  first = message.strip().splitlines()[0][:300]
  return Program(name, {"activations / temporaries": total}, total, 0.0, 0.0, {}, 0.0,
                 f"XLA: {first}")


def _fmt_gib(n: float) -> str:
  return "?" if n < 0 else f"{n / GIB:.2f}"


def format_plan(plan: dict[str, Any]) -> str:
  """The per-device table, one column per program, then FLOPs, collectives and the roofline."""
  progs = plan["programs"]
  hbm = plan["hbm_per_device"]
  width = 27
  lines = [f"{plan['model']} ({plan['parameters'] / 1e9:.2f}B parameters) on {plan['slice']}"
           f"{' x ' + str(plan['num_slices']) + ' slices' if plan['num_slices'] > 1 else ''} "
           f"({plan['topology']}: {plan['devices']} devices, {plan['hosts']} hosts), mesh "
           + " ".join(f"{k}={v}" for k, v in plan["mesh"].items() if v > 1 or k == "fsdp"),
           "", f"{'per device, GiB':<{width}}" + "".join(f"{p['name']:>18}" for p in progs)]
  for row in ("parameters", "optimizer state", "gradients", "activations / temporaries", "batch, outputs, code"):
    lines.append(f"{row:<{width}}" + "".join(f"{_fmt_gib(p['rows'].get(row, 0)):>18}" for p in progs))
  lines.append(f"{'total':<{width}}" + "".join(f"{_fmt_gib(p['total']):>18}" for p in progs))
  lines.append(f"{'HBM':<{width}}" + f"{_fmt_gib(hbm):>18}" * len(progs))
  lines.append(f"{'fits':<{width}}" + "".join(f"{('yes' if fits(p, hbm) else 'NO'):>18}" for p in progs))
  lines.append("")
  for p in progs:
    lines.append(f"{p['name']}: {p['note']}")
    if p["flops"]:
      compute = p["flops"] / plan["peak_flops_per_device"]
      memory = p["min_bytes"] / plan["hbm_bandwidth_per_device"]
      coll = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(p["collectives"].items())) or "none"
      lines.append(f"  model FLOPs per device {p['flops']:.3g} (the compiled program's matmuls {p['hlo_flops']:.3g}); "
                   f"collectives per device per call (loops counted per iteration): {coll}")
      for kind, name, size, count in p.get("top_collectives", ()):
        lines.append(f"    {kind} {size / 2**20:.1f} MiB in {count} execution(s): {name}")
      for size, name in p.get("largest_values", ()):
        lines.append(f"    largest value {size / 2**20:.1f} MiB: {name}")
      d = p.get("dispatch")
      if d:
        lines.append(f"  token dispatch per MoE layer forward ({d['dispatch']} in use; {d['group']} devices per expert "
                     f"group, {d['tokens_per_device']:.0f} tokens x {d['width']} experts per device): all-to-all "
                     f"sends ~{d['all_to_all_expected'] / 2**20:.1f} MiB (its buffers hold "
                     f"{d['all_to_all_buffers'] / 2**20:.1f} MiB), all-gather {d['all_gather'] / 2**20:.1f} MiB")
      links = sum(p["collectives"].values()) / plan["ici_bandwidth_per_device"] if plan.get(
          "ici_bandwidth_per_device") else 0.0
      lines.append(f"  roofline lower bound {1e3 * max(compute, memory, links):.1f} ms per call (compute "
                   f"{1e3 * compute:.1f} ms at peak, HBM traffic {1e3 * memory:.1f} ms, collectives "
                   f"{1e3 * links:.1f} ms at the ICI's bidirectional bandwidth"
                   + ("; across slices the DCN is slower and not modelled" if plan["num_slices"] > 1 else "") + ")")
  return "\n".join(lines)


def fits(program: dict[str, Any], hbm: int) -> bool:
  return 0 <= program["total"] <= hbm


def run(config, workdir: Optional[str] = None) -> dict[str, Any]:
  """Builds, prints and (with a workdir) writes plan.json; PlanDoesNotFitError when a program does not fit."""
  plan = build(config)
  _say(format_plan(plan))
  if workdir:
    files.write_text(os.path.join(workdir, "plan.json"), json.dumps(plan, indent=2))
    _say(f"wrote {os.path.join(workdir, 'plan.json')}")
  check(plan)
  return plan


def check(plan: dict[str, Any]) -> None:
  """PlanDoesNotFitError naming the first program over the HBM and its largest consumer."""
  hbm = plan["hbm_per_device"]
  over = [p for p in plan["programs"] if not fits(p, hbm)]
  if over:
    worst = over[0]
    consumer = max(worst["rows"], key=worst["rows"].get)
    raise PlanDoesNotFitError(
        f"the {worst['name']} needs {_fmt_gib(worst['total'])} GiB per device of {_fmt_gib(hbm)} GiB on "
        f"{plan['slice']}; the largest consumer is {consumer} ({_fmt_gib(worst['rows'][consumer])} GiB). "
        "Try a larger slice, mesh.fsdp over more devices, train.remat=full, data.max_loss_tokens, a smaller "
        "train.batch_size with train.grad_accum, or model.expert_backend=chunked")


def _say(message: str):
  print(message, flush=True)
