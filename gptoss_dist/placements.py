"""Where every weight of a model goes on a mesh: its PartitionSpec and bytes per device, from the abstract model
and the sharding rules (nothing is allocated).

    python -m gptoss_dist.placements --config=configs/gpt_oss_20b.py --config.mesh.tensor=4 --config.mesh.expert=2
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from gptoss_dist import settings
from gptoss_dist.config import ModelConfig
from gptoss_dist.model import abstract_model
from gptoss_dist.sharding import MESH_AXES, MeshError, check_model_fits_mesh, mesh_shape, param_specs, spec_divisor


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one weight goes: its shape, PartitionSpec, and bytes in all and on each device."""

    name: str
    shape: tuple[int, ...]
    spec: PartitionSpec
    nbytes: int
    bytes_per_device: int


def weight_placements(
    cfg: ModelConfig, sizes: Mapping[str, int], dtype=np.dtype("bfloat16"), *, packed_experts: bool = False
) -> list[Placement]:
    """Every weight's placement on a mesh of these sizes, from the abstract model (nothing is allocated)."""
    return list(_placements(cfg, tuple(sizes.items()), np.dtype(dtype), packed_experts))


@functools.lru_cache(maxsize=8)
def _placements(
    cfg: ModelConfig, sizes: tuple[tuple[str, int], ...], dtype: np.dtype, packed_experts: bool
) -> tuple[Placement, ...]:
    """`weight_placements`, kept for the same arguments: building the abstract model takes about a second, and
    the plan asks once for each chip it prints."""
    sizes = dict(sizes)
    _, state = nnx.split(abstract_model(cfg, dtype=dtype, packed_experts=packed_experts))
    specs = dict(nnx.to_flat_state(param_specs(state, sizes)))
    placements = []
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        nbytes = math.prod(value.shape) * np.dtype(value.dtype).itemsize
        per_device = nbytes // math.prod(spec_divisor(specs[path], sizes))
        placements.append(Placement(".".join(map(str, path)), value.shape, specs[path], nbytes, per_device))
    return tuple(placements)


def describe(
    cfg: ModelConfig, sizes: Mapping[str, int], dtype=np.dtype("bfloat16"), *, packed_experts: bool = False
) -> str:
    """A table of every weight: shape, PartitionSpec and bytes per device, with the totals per device."""
    placements = weight_placements(cfg, sizes, dtype, packed_experts=packed_experts)
    lines = [f"{p.name:<40} {str(p.shape):<22} {str(p.spec):<40} {p.bytes_per_device:>14,}" for p in placements]
    header = f"{'weight':<40} {'shape':<22} {'partition spec':<40} {'bytes/device':>14}"
    mesh = ", ".join(f"{a}={sizes[a]}" for a in MESH_AXES)
    total, per_device = sum(p.nbytes for p in placements), sum(p.bytes_per_device for p in placements)
    footer = f"mesh ({mesh}): {total:,} bytes in all, {per_device:,} bytes per device"
    return "\n".join([header, *lines, footer])


def main(argv: Sequence[str] | None = None) -> None:
    from absl import app
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, "A run config (configs/*.py).")

    def run(_):
        cfg, packed_experts = settings.model_config(config.value), config.value.packed_experts
        mesh = config.value.mesh
        # Without -1 the mesh names its own device count: describe it without needing those devices here.
        num_devices = math.prod(mesh.values()) if -1 not in mesh.values() else jax.device_count()
        try:
            sizes = mesh_shape(mesh, num_devices)
            check_model_fits_mesh(cfg, sizes, packed_experts=packed_experts)
        except MeshError as err:
            sys.exit(f"error: {err}")
        print(describe(cfg, sizes, np.dtype(settings.dtype(config.value)), packed_experts=packed_experts))

    app.run(run, argv=list(argv) if argv is not None else None)


if __name__ == "__main__":
    main()
