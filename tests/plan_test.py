"""Ahead-of-time plans for TPU slices, compiled here on the CPU through libtpu's topology descriptions."""

import json

import jax
import numpy as np
import pytest

import phds_jax as pj
from conftest import toy_train_config
from phds_jax.io import load as load_lib
from phds_jax import errors
from phds_jax import main
from phds_jax.plan import cost, programs as plan, topology as slices
from phds_jax.model import sharding


@pytest.mark.parametrize("name, chips, topology", [
    ("v5e-16", 16, "v5e:4x4"), ("v5litepod-32", 32, "v5e:4x8"), ("v4-32", 16, "v4:2x2x4"),
    ("v5p-32", 16, "v5p:2x2x4"), ("v6e-8", 8, "v6e:2x4")])
def test_slice_names_follow_cloud_tpu(name, chips, topology):
  spec = slices.parse_slice(name)
  assert (spec.chips, spec.topology, spec.num_slices) == (chips, topology, 1)


@pytest.mark.parametrize("name, message", [("v5e-12", r"v5e slices come in sizes \[1, 4, 8, 16"),
                                           ("tpu-16", "expected a Cloud TPU slice name"),
                                           ("v4-31", "v4 slices come in sizes")])
def test_bad_slice_names_are_errors(name, message):
  with pytest.raises(ValueError, match=message):
    slices.parse_slice(name)


def test_model_flops_count_k_experts_and_attention():
  cfg = pj.preset("tiny-olmoe")
  one, two = cost.forward_flops_per_token(cfg, 1, 0), cost.forward_flops_per_token(cfg, 2, 0)
  expert = 2 * 3 * cfg.hidden_size * cfg.moe_intermediate_size * len(cfg.moe_layer_indices)
  assert two - one == pytest.approx(expert)
  attention = cost.forward_flops_per_token(cfg, 1, 10) - one
  assert attention == pytest.approx(cfg.num_hidden_layers * 4 * cfg.num_attention_heads * cfg.resolved_head_dim * 10)


def test_collective_bytes_read_result_shapes():
  hlo = """
  %ag = bf16[8,1024]{1,0} all-gather(bf16[2,1024]{1,0} %p), dimensions={0}
  %ar-start = (f32[16]{0}, f32[16]{0}) all-reduce-start(f32[16]{0} %x), to_apply=%add
  %ar-done = f32[16]{0} all-reduce-done((f32[16]{0}, f32[16]{0}) %ar-start)
  %a2a = (s32[4,2]{1,0}, s32[4,2]{1,0}) all-to-all(s32[4,2]{1,0} %a, s32[4,2]{1,0} %b)
  """
  assert plan.collective_bytes(hlo) == {"all-gather": 8 * 1024 * 2, "all-reduce": 64, "all-to-all": 32}


def test_a_collective_split_into_async_fusion_continuations_counts_once():
  """XLA TPU's async collective fusion: one all-gather (channel 87) as a start and continuations fused into
  the compute they overlap, each repeating the full shape (lines trimmed from a v5e-16 train step, where the
  LM head's all-gather appeared 64 times per micro-batch and was counted 64 times)."""
  line = ('  %all-gather.{n} = bf16[2048,50304]{{1,0:T(8,128)(2,1)}} all-gather(%param_0.{n}), channel_id=87, '
          'dimensions={{0}}, metadata={{op_name="jit(_train_step)/jvp()/dot_general"}}, backend_config={{'
          '"flag_configs":[],"async_collective_fusion_config":{{"flag_start":"{start}","flag_end":"{end}"}}}}')
  hlo = "\n".join([line.format(n=1, start=-1, end=-1)] + [line.format(n=n, start=2, end=8) for n in range(2, 65)])
  assert plan.collective_bytes(hlo) == {"all-gather": 2048 * 50304 * 2}


# A compiled 4-device program (scan of 5 steps, psum in the body, inside a 3-trip outer loop written by hand
# around it, whose count only its condition states, as TPU programs do), trimmed to the lines the parser reads.
_LOOPS_HLO = """
%region_1.0 (a: f32[], b: f32[]) -> f32[] {
  ROOT %add = f32[] add(%a, %b)
}

%cond2 (p: (s32[], f32[2,16])) -> pred[] {
  %constant.3 = s32[]{:T(128)} constant(3)
  %gte = s32[] get-tuple-element(%p), index=0
  ROOT %lt.1 = pred[]{:T(512)} compare(%gte, %constant.3), direction=LT, metadata={op_name="jit(f)/while/cond/lt"}
}

%inner_body (param: (s32[], f32[2,16])) -> (s32[], f32[2,16]) {
  %psum.7 = f32[2,16]{1,0} all-reduce(%get-tuple-element.19), channel_id=1, to_apply=%region_1.0, metadata={op_name="jit(f)/while/body/psum"}
  %ragged = bf16[64,8]{1,0} ragged-all-to-all(%x, %out, %a, %b, %c, %d), metadata={op_name="jit(f)/dispatch"}
  %fusion.1 = f32[2,16]{1,0} fusion(%psum.7), kind=kLoop, calls=%fused_computation
}

%outer_body (param: (s32[], f32[2,16])) -> (s32[], f32[2,16]) {
  %while.9 = (s32[], f32[2,16]{1,0}) while(%tuple.8), condition=%cond, body=%inner_body, backend_config={"known_trip_count":{"n":"5"}}
  %ag = f32[8,16]{1,0} all-gather(%p), dimensions={0}, metadata={op_name="jit(f)/while/body/all_gather"}
}

ENTRY %main.5_spmd (param.3: f32[2,16]) -> f32[2,16] {
  %while.10 = (s32[], f32[2,16]{1,0}) while(%tuple.9), condition=%cond2, body=%outer_body
  %unknown = (s32[], f32[2,16]{1,0}) while(%tuple.11), condition=%cond3, body=%inner_body
  %ar = f32[4]{0} all-reduce(%y), to_apply=%region_1.0
}
"""


def test_collectives_inside_loops_count_once_per_iteration():
  """Nested trip counts multiply (3, read from its condition, x 5, stated by XLA), a loop of unknown trip
  count counts once, ragged all-to-all is a kind of its own, and the largest collectives are named by their
  JAX op."""
  ops = plan.collective_ops(_LOOPS_HLO)
  # the inner body runs 3 x 5 times inside the nested loops and once in the loop of unknown trip count
  assert sorted((op.kind, op.executions) for op in ops) == [
      ("all-gather", 3), ("all-reduce", 1), ("all-reduce", 16), ("ragged-all-to-all", 16)]
  assert plan.collective_bytes(_LOOPS_HLO) == {"all-reduce": 128 * 16 + 16, "all-gather": 512 * 3,
                                               "ragged-all-to-all": 1024 * 16}
  assert plan.top_collectives(ops, 2) == [("ragged-all-to-all", "jit(f)/dispatch", 1024 * 16, 16),
                                                 ("all-reduce", "jit(f)/while/body/psum", 128 * 16, 16)]


def test_matmul_flops_count_each_loop_iteration():
  """A dot inside a scan of 5 layers counts 5 times (XLA's cost analysis counts it once); a batched dot inside
  a fusion counts its batch and contracting dims (operand shapes looked up by name, as CPU prints them)."""
  import jax
  import jax.numpy as jnp

  def layers(w, x):
    return jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x, w)[0]

  hlo = jax.jit(layers).lower(jnp.ones((5, 32, 32)), jnp.ones((8, 32))).compile().as_text()
  assert plan.matmul_flops(hlo) == 5 * 2 * 8 * 32 * 32
  batched = jax.jit(lambda a, b: jnp.einsum("bij,bjk->bik", a, b) + 1.0).lower(
      jnp.ones((3, 4, 5)), jnp.ones((3, 5, 6))).compile().as_text()
  assert plan.matmul_flops(batched) == 2 * 3 * 4 * 5 * 6
  conv = "%c = bf16[8,64]{1,0} convolution(bf16[8,32]{1,0} %x, bf16[32,64]{1,0} %w), dim_labels=bf_io->bf"
  assert plan.matmul_flops(conv) == 2 * 8 * 64 * 32
  # the largest values by JAX op: the [32, 1000] ones, then the [8, 1000] product (float32)
  head = jax.jit(lambda w, x: layers(w, x) @ jnp.ones((32, 1000)) * 2.0).lower(
      jnp.ones((5, 32, 32)), jnp.ones((8, 32))).compile().as_text()
  assert plan.largest_values(head, 2) == [(32 * 1000 * 4, "jit(<lambda>)/broadcast_in_dim"),
                                          (8 * 1000 * 4, "jit(<lambda>)/dot_general")]


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
  """The toy training config planned for a v5e-4 (4 chips, one host), parameters sharded over fsdp."""
  tmp = tmp_path_factory.mktemp("plan")
  config = toy_train_config(tmp, **{"compile_topology": "v5e-4", "mesh.data": 1, "mesh.fsdp": -1,
                                    "train.remat": "dots"})
  return config, main.run(config, str(tmp / "w")), tmp / "w"


def test_a_plan_compiles_the_three_programs_for_the_slice(tiny_plan, capsys):
  config, result, workdir = tiny_plan
  assert (result["devices"], result["hosts"], result["mesh"]["fsdp"]) == (4, 1, 4)
  assert [p["name"] for p in result["programs"]] == ["train step", "validation step", "generation"]
  assert json.loads((workdir / "plan.json").read_text())["programs"] == json.loads(json.dumps(result["programs"]))
  cfg = load_lib.run_model_config(config)
  shapes = jax.eval_shape(lambda: pj.init_params(cfg, jax.random.key(0)))
  # per device: every parameter's fsdp block (dims that 4 does not divide stay whole), in float32
  expected = sum(4 * int(np.prod(s.shape)) // (4 if any(d % 4 == 0 for d in s.shape) else 1)
                 for s in jax.tree.leaves(shapes))
  train_step = result["programs"][0]
  assert abs(train_step["rows"]["parameters"] - expected) <= 0.05 * expected
  assert train_step["rows"]["optimizer state"] == pytest.approx(2 * train_step["rows"]["parameters"], rel=0.01)
  assert all(p["total"] > 0 and plan.fits(p, result["hbm_per_device"]) for p in result["programs"])
  assert result["hbm_per_device"] == 16 * 2**30 and "remat=dots" in train_step["note"]
  assert train_step["flops"] > result["programs"][1]["flops"] > 0
  # collectives: fsdp gathers the parameters; the three largest are named; the roofline counts them at the
  # v5e's 400 GB/s bidirectional ICI
  assert result["ici_bandwidth_per_device"] == 400e9 and train_step["collectives"]["all-gather"] > 0
  top = train_step["top_collectives"]
  assert 1 <= len(top) <= 3 and top[0][2] == max(t[2] for t in top) and all(t[1] for t in top)
  links = sum(train_step["collectives"].values()) / 400e9
  text = plan.format_plan(result)
  assert f"collectives {1e3 * links:.1f} ms at the ICI's bidirectional bandwidth" in text
  assert f"    {top[0][0]} {top[0][2] / 2**20:.1f} MiB in {top[0][3]} execution(s): {top[0][1]}" in text


def test_a_plan_that_does_not_fit_names_the_largest_consumer(tiny_plan):
  _, result, _ = tiny_plan
  small = dict(result, hbm_per_device=1000)
  with pytest.raises(errors.PlanDoesNotFitError, match=r"the train step needs .* GiB per device of 0.00 GiB on "
                                                       r"v5e-4; the largest consumer is"):
    plan.check(small)
  plan.check(result)  # fits


def test_plan_config_mistakes_are_reported_before_compiling(tmp_path):
  config = toy_train_config(tmp_path, **{"compile_topology": "v5e-5", "train.remat": "some"})
  with pytest.raises(errors.ConfigProblems, match="v5e slices come in sizes"):
    main.run(config, str(tmp_path / "w"))
  config = toy_train_config(tmp_path, **{"compile_topology": "v5e-4", "train.remat": "some", "mesh.tensor": 3})
  with pytest.raises(errors.ConfigProblems, match="train.remat='some'"):
    main.run(config, str(tmp_path / "w"))
  config = toy_train_config(tmp_path, **{"compile_topology": "v5e-4", "mesh.tensor": 3})
  with pytest.raises(errors.ConfigProblems, match="mesh: 4 devices cannot fill"):
    main.run(config, str(tmp_path / "w"))


def test_two_slices_get_a_slice_axis_over_dcn():
  devices = slices.topology_devices(slices.parse_slice("v5e-4", num_slices=2))
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1}, devices)
  assert dict(mesh.shape) == {"slice": 2, "data": 1, "fsdp": 4, "expert": 1, "tensor": 1}
  for i in range(2):  # each index of the slice axis is one slice: only its devices talk over ICI
    assert {d.slice_index for d in mesh.devices[i].flat} == {i}
  assert sharding.logical_to_spec(dict(mesh.shape), ("batch", "length"))[0] == ("slice", "fsdp")
