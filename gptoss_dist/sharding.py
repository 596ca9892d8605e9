"""The device mesh and the one table that places every weight, the KV cache and the activations on it.

The mesh has three axes: `data` (batch), `tensor` (attention heads, the experts' intermediate dimension,
the vocabulary) and `expert` (experts, and the vocabulary too). Weights, cache and activations name their
axes logically (`model.py` declares each weight's names once); `RULES` maps a logical name to mesh axes.

KV heads: when the tensor axis does not divide the number of KV heads (say 8 KV heads on 16 chips), the
KV projections and the KV cache are replicated over `tensor` instead; each device then computes every KV
head, which costs 2 x hidden x kv_heads x head_dim weights, small beside the query heads.
`gptoss_dist.placements` prints where this puts every weight of a model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental.layout import Format, Layout
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from gptoss_dist import mxfp4
from gptoss_dist.config import ModelConfig

MESH_AXES = ("data", "tensor", "expert")

# Logical axis -> mesh axes. None replicates.
RULES: dict[str, tuple[str, ...] | None] = {
    # weights
    "vocab": ("tensor", "expert"),
    "embed": None,
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),  # replicated where `tensor` does not divide the KV heads (see above)
    "head_dim": None,
    "router_experts": None,
    "experts": ("expert",),
    "expert_mlp": ("tensor",),
    # activations and KV cache
    "batch": ("data",),
    # a decode step's rows of logits while it samples: each device sorts and draws for its own rows over the
    # whole vocabulary, instead of every device holding every row's
    "sampling_rows": ("data", "tensor", "expert"),
    "seq": None,
    "cache_seq": None,
}
# Logical axes that fall back to replication when their mesh axes do not divide them.
REPLICATE_IF_INDIVISIBLE = {"kv_heads"}
# Logical axes that fall back to another's mesh axes when theirs do not divide them.
FALLBACK_IF_INDIVISIBLE = {"sampling_rows": "batch"}


class MeshError(ValueError):
    """Mesh settings that do not fit the devices or the model."""


def mesh_shape(settings: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolves the mesh sizes (one may be -1, "the rest") against the number of devices."""
    sizes = {axis: int(settings[axis]) for axis in MESH_AXES}
    rest = [axis for axis, size in sizes.items() if size == -1]
    if len(rest) > 1:
        raise MeshError(f"mesh {sizes}: only one axis may be -1")
    if any(size == 0 or size < -1 for size in sizes.values()):
        raise MeshError(f"mesh {sizes}: sizes must be positive (or -1 for the rest)")
    known = math.prod(size for size in sizes.values() if size != -1)
    if rest:
        if num_devices % known:
            raise MeshError(f"mesh {sizes}: {num_devices} devices do not divide by {known}")
        sizes[rest[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise MeshError(
            f"mesh {sizes} has {math.prod(sizes.values())} devices but there are {num_devices}; "
            "set mesh.data, mesh.tensor and mesh.expert so that their product is the device count"
        )
    return sizes


def check_model_fits_mesh(cfg: ModelConfig, sizes: Mapping[str, int], *, packed_experts: bool = False) -> None:
    """Raises MeshError where a mesh axis does not divide what it shards. Packed (MXFP4) experts split the
    down projection's groups of 32 intermediate values over `tensor`, so it must divide their number too."""
    tensor, expert = sizes["tensor"], sizes["expert"]
    groups = cfg.intermediate_size // mxfp4.VALUES_PER_BLOCK
    problems = []
    if cfg.num_heads % tensor:
        problems.append(f"{cfg.num_heads} query heads do not divide over mesh.tensor={tensor}")
    if cfg.intermediate_size % tensor:
        problems.append(f"expert intermediate size {cfg.intermediate_size} does not divide over mesh.tensor={tensor}")
    elif packed_experts and groups % tensor:
        problems.append(
            f"with packed experts, the {groups} MXFP4 groups of the expert intermediate size "
            f"({cfg.intermediate_size} / {mxfp4.VALUES_PER_BLOCK}) do not divide over mesh.tensor={tensor}: "
            f"use a mesh.tensor that divides {groups} and shard the experts over mesh.expert instead"
        )
    if cfg.num_experts % expert:
        problems.append(f"{cfg.num_experts} experts do not divide over mesh.expert={expert}")
    if cfg.vocab_size % (tensor * expert):
        problems.append(f"vocabulary {cfg.vocab_size} does not divide over mesh.tensor x mesh.expert={tensor * expert}")
    if problems:
        raise MeshError("; ".join(problems))


def make_mesh(
    settings: Mapping[str, int],
    cfg: ModelConfig,
    devices: Sequence[jax.Device] | None = None,
    *,
    packed_experts: bool = False,
) -> Mesh:
    """A mesh with axes (data, tensor, expert) over `devices` (default: every device of every process)."""
    devices = list(devices) if devices is not None else jax.devices()
    sizes = mesh_shape(settings, len(devices))
    check_model_fits_mesh(cfg, sizes, packed_experts=packed_experts)
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_spec(
    logical_axes: Sequence[str | None], shape: Sequence[int], sizes: Mapping[str, int]
) -> PartitionSpec:
    """The PartitionSpec of an array with these logical axes, on a mesh of these sizes."""
    spec = []
    for name, dim in zip(logical_axes, shape, strict=True):
        axes = _dividing_axes(name, dim, sizes) if name is not None else ()
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


def _dividing_axes(name: str, dim: int, sizes: Mapping[str, int]) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that split a dimension of `dim` with logical axis `name`."""
    axes = tuple(a for a in (RULES[name] or ()) if sizes[a] > 1)
    if not axes or dim % math.prod(sizes[a] for a in axes) == 0:
        return axes
    if name in REPLICATE_IF_INDIVISIBLE:
        return ()
    if name in FALLBACK_IF_INDIVISIBLE:
        return _dividing_axes(FALLBACK_IF_INDIVISIBLE[name], dim, sizes)
    raise MeshError(f"axis {name!r} of size {dim} does not divide over mesh axes {axes}")


def spec_divisor(spec: PartitionSpec, sizes: Mapping[str, int]) -> list[int]:
    """How many ways each array axis is split by `spec`."""
    divisors = []
    for entry in spec:
        axes = (entry,) if isinstance(entry, str) else (entry or ())
        divisors.append(math.prod(sizes[a] for a in axes))
    return divisors


def mesh_sizes(mesh: Mesh | jax.sharding.AbstractMesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))


def param_specs(state: nnx.State, sizes: Mapping[str, int]) -> nnx.State:
    """The PartitionSpec of every parameter, from its logical axes."""

    def spec(var: nnx.Variable) -> PartitionSpec:
        return logical_to_spec(var.get_metadata()["logical_axes"], var.get_value().shape, sizes)

    return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_formats(state: nnx.State, mesh: Mesh) -> nnx.State:
    """Where every parameter goes on `mesh`: its sharding, and its layout where the weight pins one (else the
    device's default): `row_major` on any device, `tpu_major_to_minor` on a TPU. A TPU's default layout puts
    the dimension that pads least minor (the experts' [E, hidden, 720] hidden-minor, packed scales
    [E, out, in/32] as [in/32, E, out]); the expert kernels and the embedding lookup read theirs otherwise, so
    each decode call copied every layer's expert weights before its step loop (see BENCHMARKS.md)."""
    on_tpu = mesh.devices.flat[0].platform == "tpu"

    def place(var: nnx.Variable, spec: PartitionSpec) -> Format:
        metadata = var.get_metadata()
        if metadata.get("row_major"):
            major_to_minor = tuple(range(len(var.get_value().shape)))
        else:
            major_to_minor = metadata.get("tpu_major_to_minor") if on_tpu else None
        layout = None if major_to_minor is None else Layout(major_to_minor=major_to_minor)
        return Format(layout, NamedSharding(mesh, spec))

    specs = param_specs(state, mesh_sizes(mesh))
    return jax.tree.map(place, state, specs, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Pins an activation's sharding by logical axes when a mesh is set (`jax.set_mesh`); else returns x."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh_sizes(mesh)))


def put(value: np.ndarray, where: NamedSharding | Format) -> jax.Array:
    """Places a host array into its sharding (and layout); each process transfers only its own devices' shards."""
    return jax.make_array_from_callback(value.shape, where, lambda index: value[index])
