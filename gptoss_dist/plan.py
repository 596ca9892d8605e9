"""Will it fit: per chip, the bytes of the weights, the KV cache and the working memory of a run.

    python -m gptoss_dist.plan --config=configs/gpt_oss_20b.py --config.mesh.tensor=4 --config.max_slots=64

Weights come from the sharding rules (exactly what each device holds); packed experts (`packed_experts`)
count their MXFP4 blocks and scales, a byte per two weights and one per 32. The KV cache is the engine's:
each slot's window in the sliding layers and the pool of `kv_pages` pages of `page_size` positions in the
full-attention layers, split over `data` and, where they divide, the KV heads over `tensor`; the plan says how
many tokens the pool holds per chip. Working memory is an estimate of the largest call's live activations: a prefill
call of `prefill_tokens` prompt tokens (attention a block of queries and keys at a time, the experts' token
copies, the residual stream, the last positions' logits), and with packed experts one expert's weights
dequantized at a time. `gptoss_dist.compile` gives XLA's own figures for a TPU topology.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping, Sequence

import numpy as np

from gptoss_dist import settings
from gptoss_dist.attention import DEFAULT_BLOCK
from gptoss_dist.config import ModelConfig
from gptoss_dist.engine import cache_bytes, page_pool
from gptoss_dist.placements import weight_placements
from gptoss_dist.sharding import MESH_AXES, check_model_fits_mesh, mesh_shape

GiB = 1 << 30
# Memory per device: a chip's, except tpu7x's 192 GiB chip, which JAX sees as two devices.
CHIPS = {"v5e": 16 * GiB, "v6e": 32 * GiB, "v5p": 95 * GiB, "tpu7x": 96 * GiB, "h100": 80 * GiB, "h200": 141 * GiB}
F32 = 4


class PlanError(ValueError):
    """A run that cannot fit its chips; the message says which setting to change."""


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes one chip needs for a run."""

    weights: int
    kv_cache: int
    working: int
    pool_tokens: int  # positions the full-attention layers' pool holds on the chip


    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.working


def kv_cache_per_chip(
    cfg: ModelConfig, sizes: Mapping[str, int], max_slots: int, max_len: int, pool_tokens: int, dtype,
    rings: bool = True,
) -> int:
    kv_split = sizes["tensor"] if cfg.num_kv_heads % sizes["tensor"] == 0 else 1
    return cache_bytes(cfg, max_slots, max_len, pool_tokens, dtype, rings) // (sizes["data"] * kv_split)


def working_per_chip(
    cfg: ModelConfig, sizes: Mapping[str, int], max_slots: int, max_len: int, prefill_tokens: int, dtype,
    packed_experts: bool = False,
) -> int:  # fmt: skip
    """Largest live activations of a prefill call, on one chip (an estimate): prompt pieces of at most
    `prefill_tokens` tokens in all, a row or more per data shard, whose attention runs a block at a time."""
    data, tensor = sizes["data"], sizes["tensor"]
    piece = min(max(1, prefill_tokens // data), max_len)
    rows = math.ceil(min(max_slots, max(data, prefill_tokens // piece)) / data)
    tokens = rows * piece
    itemsize = np.dtype(dtype).itemsize
    heads = math.ceil(cfg.num_heads / tensor)
    block = min(DEFAULT_BLOCK, piece)
    scores = 3 * rows * heads * block * DEFAULT_BLOCK * F32  # a block's scores, weights and mask
    attention = tokens * (heads * cfg.head_dim * (itemsize + F32) + 2 * cfg.num_kv_heads * cfg.head_dim * itemsize)
    expert_rows = tokens * cfg.experts_per_token
    experts = expert_rows * (2 * cfg.hidden_size + 3 * cfg.intermediate_size // tensor) * itemsize
    residual = 4 * tokens * cfg.hidden_size * F32
    logits = rows * cfg.vocab_size // (tensor * sizes["expert"]) * F32
    dequantized = 3 * cfg.hidden_size * cfg.intermediate_size // tensor * itemsize if packed_experts else 0
    return scores + attention + experts + residual + logits + dequantized


def plan_memory(
    cfg: ModelConfig,
    sizes: Mapping[str, int],
    *,
    max_slots: int,
    max_len: int,
    prefill_tokens: int = 8192,
    dtype=np.dtype("bfloat16"),
    packed_experts: bool = False,
    pool: tuple[int, int] | None = None,
    rings: bool = True,
) -> MemoryPlan:
    """The plan of a run whose pool has (page_size, kv_pages) `pool` (`engine.page_pool`; None: the default),
    the sliding layers keeping a window per slot (`rings`) or, with prefix caching, a pool too."""
    weights = sum(p.bytes_per_device for p in weight_placements(cfg, sizes, dtype, packed_experts=packed_experts))
    page_size, kv_pages = pool or page_pool(max_slots, max_len)
    pool_tokens = page_size * kv_pages
    return MemoryPlan(
        weights=weights,
        kv_cache=kv_cache_per_chip(cfg, sizes, max_slots, max_len, pool_tokens, dtype, rings),
        working=working_per_chip(cfg, sizes, max_slots, max_len, prefill_tokens, dtype, packed_experts),
        pool_tokens=pool_tokens // sizes["data"],
    )


def check_fits(plan: MemoryPlan, chip_bytes: int, chip: str) -> None:
    """Raises PlanError, naming the setting to turn, where the plan exceeds the chip."""
    if plan.total <= chip_bytes:
        return
    need = f"needs {plan.total / GiB:.1f} GiB per chip, {chip} has {chip_bytes / GiB:.0f} GiB"
    if plan.weights > 0.9 * chip_bytes:
        knob = "shard the weights over more chips: raise mesh.tensor or mesh.expert"
    elif plan.kv_cache >= plan.working:
        knob = "shrink the KV cache: lower max_slots or max_len, or spread slots over a larger mesh.data"
    else:
        knob = "shrink the prefill: lower prefill_tokens or max_len"
    raise PlanError(
        f"{need} (weights {plan.weights / GiB:.1f}, KV cache {plan.kv_cache / GiB:.1f}, "
        f"working {plan.working / GiB:.1f} GiB); {knob}"
    )


def render(plan: MemoryPlan, sizes: Mapping[str, int], chips: Sequence[str]) -> str:
    mesh = ", ".join(f"{a}={sizes[a]}" for a in MESH_AXES)
    lines = [
        f"per chip on mesh ({mesh}): weights {plan.weights / GiB:.2f} GiB, KV cache {plan.kv_cache / GiB:.2f} GiB, "
        f"working {plan.working / GiB:.2f} GiB, total {plan.total / GiB:.2f} GiB",
        f"the KV pool holds {plan.pool_tokens:,} tokens per chip",
        f"{'chip':<6} {'memory':>9} {'used':>6}  fits",
    ]
    for chip in chips:
        used = plan.total / CHIPS[chip]
        lines.append(f"{chip:<6} {CHIPS[chip] / GiB:>6.0f} GiB {used:>6.0%}  {'yes' if used <= 1 else 'no'}")
    return "\n".join(lines)




DEVICE_KINDS = {"TPU v5 lite": "v5e", "TPU v6 lite": "v6e", "TPU v5p": "v5p", "TPU v5": "v5p", "TPU7x": "tpu7x",
                "H100": "h100", "H200": "h200"}  # fmt: skip


def chip_name(device_kind: str) -> str | None:
    """The CHIPS name of a JAX device kind ("TPU v6 lite": "v6e"), or None for one not listed."""
    return next((name for prefix, name in DEVICE_KINDS.items() if prefix in device_kind), None)


def chip_memory(chip: str, device) -> tuple[str, int] | None:
    """(name, bytes) of the memory to plan for: the named chip's, else what `device` reports or is known to
    have; None for a host CPU, which has no fixed device memory."""
    if chip:
        if chip not in CHIPS:
            raise PlanError(f"chip {chip!r} is not one of {sorted(CHIPS)}")
        return chip, CHIPS[chip]
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return device.device_kind, int(stats["bytes_limit"])
    kind = chip_name(device.device_kind)
    return (kind, CHIPS[kind]) if kind else None


def main(argv: Sequence[str] | None = None) -> None:
    from absl import app
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, "A run config (configs/*.py).")

    def run(_):
        run_settings = config.value
        cfg = settings.model_config(run_settings)
        mesh = run_settings.mesh
        if -1 in mesh.values():
            sys.exit("error: give every mesh size (no -1) to plan without the devices")
        try:
            cfg.check_max_len(run_settings.max_len)
            sizes = mesh_shape(mesh, math.prod(mesh.values()))
            check_model_fits_mesh(cfg, sizes, packed_experts=run_settings.packed_experts)
            pool = page_pool(run_settings.max_slots, run_settings.max_len, run_settings.page_size,
                             run_settings.kv_pages, sizes["data"])  # fmt: skip
        except ValueError as err:  # a ConfigError, a MeshError, or a pool that does not fit max_len or the mesh
            sys.exit(f"error: {err}")
        plan = plan_memory(cfg, sizes, max_slots=run_settings.max_slots, max_len=run_settings.max_len,
                           prefill_tokens=run_settings.prefill_tokens, dtype=np.dtype(settings.dtype(run_settings)),
                           packed_experts=run_settings.packed_experts, pool=pool,
                           rings=not run_settings.prefix_caching)  # fmt: skip
        print(render(plan, sizes, list(CHIPS)))

    app.run(run, argv=list(argv) if argv is not None else None)


if __name__ == "__main__":
    main()
