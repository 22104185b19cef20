"""The mesh's axis names and the default logical -> mesh axis rules: plain data, without JAX, so that
a config can be built and checked before JAX is imported (model/sharding.py applies them)."""

SLICE_AXIS = "slice"
ICI_AXES = ("data", "fsdp", "expert", "tensor")
MESH_AXES = (SLICE_AXIS, *ICI_AXES)

# logical axis -> mesh axes (in order)
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": (SLICE_AXIS, "data", "fsdp", "expert"),
    "length": (),
    # dense weights shard over the expert axis too; expert weights (exp first) take "expert" for their
    # experts, so their embed dim gets "fsdp" only (an axis already used by a dim is skipped)
    "embed": ("fsdp", "expert"),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "mlp": ("tensor",),
    "exp": ("expert",),
    "norm": (),
    "router": (),
    "layers": (),  # the stacked decoder layers (scanned): replicated (no pipelining)
}
