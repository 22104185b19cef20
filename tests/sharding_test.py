"""Logical-axis rules and the mesh: parameters and activations are placed by the rules of the run."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import phds_jax as pj
from phds_jax.model import sharding
from phds_jax.model import layout


def test_default_rules_shard_the_batch_over_every_data_parallel_axis():
  shape = {"slice": 2, "data": 2, "fsdp": 4, "expert": 2, "tensor": 1}
  assert sharding.logical_to_spec(shape, ("batch", "length", "embed")) == P(("slice", "data", "fsdp", "expert"), None, None)
  # expert weights: experts over "expert", the embedding over "fsdp", tensor (size 1) not at all;
  # 6 rows do not divide over the 32 data-parallel devices, so they stay replicated
  assert sharding.logical_to_spec(shape, ("exp", "embed", "mlp"), (8, 64, 32)) == P("expert", "fsdp", None)
  assert sharding.logical_to_spec(shape, ("batch", "length"), (6, 16)) == P(None, None)


def test_config_rules_replace_the_defaults_for_the_block():
  shape = {"slice": 1, "data": 1, "fsdp": 4, "expert": 2, "tensor": 2}
  rules = dict(sharding.DEFAULT_RULES, embed="", mlp="tensor,fsdp", exp="expert")
  with sharding.axis_rules(rules):
    assert sharding.logical_to_spec(shape, ("exp", "embed", "mlp")) == P("expert", None, ("tensor", "fsdp"))
  assert sharding.logical_to_spec(shape, ("exp", "embed", "mlp")) == P("expert", "fsdp", "tensor")


@pytest.mark.parametrize("rules, message", [
    ({"embed": "fsdp,model"}, "axis_rules.embed='fsdp,model': no mesh axis 'model'"),
    ({"embed": "fsdp,fsdp"}, "names a mesh axis twice"),
    ({"embed": None}, r"no rule for logical axes \['embed'\]"),
])
def test_bad_rules_are_errors_naming_the_axis(rules, message):
  full = {k: v for k, v in dict(sharding.DEFAULT_RULES, **rules).items() if v is not None}
  with pytest.raises(ValueError, match=message):
    sharding.parse_rules(full)


def test_a_logical_axis_without_a_rule_or_a_leaf_without_axes_is_an_error():
  with pytest.raises(ValueError, match="logical axis 'hiddn' has no sharding rule"):
    sharding.logical_to_spec({"fsdp": 2}, ("hiddn",))
  cfg = pj.preset("tiny-olmoe")
  mesh = sharding.make_mesh({})
  tree = {"embed_tokens": {"embedding": jax.ShapeDtypeStruct((cfg.vocab_size, cfg.hidden_size), np.float32)},
          "extra": {"kernel": jax.ShapeDtypeStruct((4, 4), np.float32)}}
  with pytest.raises(ValueError, match="extra/kernel .* no parameter of the model layout"):
    sharding.param_shardings(mesh, tree, layout.axes_by_path(cfg))
  with pytest.raises(ValueError, match="extra/kernel is no parameter of the olmoe layout"):
    layout.layout_sharding(mesh, cfg)(("extra", "kernel"), (4, 4))


def test_every_layout_axis_has_a_default_rule():
  tiny = [name for name in pj.PRESETS if name.startswith("tiny-")]  # the axes depend on the family, not sizes
  assert {pj.preset(n).model_type for n in tiny} == {pj.preset(n).model_type for n in pj.PRESETS}
  for name in tiny:
    for spec in layout.param_layout(pj.preset(name)):
      assert all(a is None or a in sharding.DEFAULT_RULES for a in spec.axes), spec


def test_mesh_has_a_slice_axis_sized_by_the_devices():
  mesh = sharding.make_mesh({"data": -1})
  assert mesh.axis_names == sharding.MESH_AXES
  assert dict(mesh.shape) == {"slice": 1, "data": jax.device_count(), "fsdp": 1, "expert": 1, "tensor": 1}
  with pytest.raises(ValueError, match="unknown mesh axes \\['slice'\\]"):
    sharding.make_mesh({"slice": 2})
