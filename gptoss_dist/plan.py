"""Will it fit: per chip, the bytes of the weights, the KV cache and the working memory of a run.

    python -m gptoss_dist.plan --config=configs/gpt_oss_20b.py --config.mesh.tensor=4 --config.max_slots=64

Weights come from the sharding rules (exactly what each device holds); packed experts (`packed_experts`)
count their MXFP4 blocks and scales, a byte per two weights and one per 32. The KV cache is the engine's:
each slot's window in the sliding layers and the pool of `kv_pages` pages of `page_size` positions in the
full-attention layers, split over `data` and, where they divide, the KV heads over `tensor`; the plan says how
many tokens the pool holds per chip. Working memory is a model of XLA's temporaries for a TPU, buffer by buffer
from their shapes (what they are: BENCHMARKS.md, "Working memory on a TPU"), per call: the decode call's
(sampling's float32 rows over the vocabulary, a chip's share of the slots; a little a layer; on tpu7x, the
weights its matmuls read, re-tiled) and the largest prefill call's (the residual stream beside one chunk of
the experts' token copies); the plan counts the larger. `gptoss_dist.compile` gives XLA's own figures for a TPU
topology.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping, Sequence

import numpy as np

from gptoss_dist import settings
from gptoss_dist.config import ModelConfig
from gptoss_dist.engine import cache_bytes, page_pool
from gptoss_dist.model import KERNEL_BLOCK_ROWS, block_layout, expert_chunk_tokens
from gptoss_dist.placements import Placement, weight_placements
from gptoss_dist.sharding import MESH_AXES, check_model_fits_mesh, logical_to_spec, mesh_shape, spec_divisor

GiB = 1 << 30
# Memory per device: a chip's, except tpu7x's 192 GiB chip, which JAX sees as two devices.
CHIPS = {"v5e": 16 * GiB, "v6e": 32 * GiB, "v5p": 95 * GiB, "tpu7x": 96 * GiB, "h100": 80 * GiB, "h200": 141 * GiB}
F32 = 4
LANES = 128  # a TPU vector register's lanes: an array's minor dimension is padded to a multiple
# The weights a matmul reads, by name, and the dimensions it contracts (after the experts', where there is one).
MATMUL_CONTRACTED_DIMS = {"q": (0,), "k": (0,), "v": (0,), "o": (0, 1), "router": (0,), "gate_up": (1,),
                          "down": (1,), "unembed": (0,)}  # fmt: skip
TPU7X_BF16_TILE_ROWS = 16  # tpu7x's matmuls read bf16 weights in (16, 128) tiles; parameters have (8, 128)
# XLA's temporaries in a prefill call beyond the buffers the plan models, per layer: mostly the state of each
# layer's asynchronous copies and slices, a few bytes each at 16 KiB strides, in its buffer assignment and as
# much again beyond it (BENCHMARKS.md, "Prefill on a TPU").
PREFILL_BYTES_PER_LAYER = 3 << 20
# Buffers of a prefill call's tokens' rows [tokens, hidden] in HBM at once, by chip (others: 4): v5p keeps the
# attention's output beside its sum over `tensor` while the experts run, and XLA counts one more beyond its buffer
# assignment (BENCHMARKS.md, "Issue 16's table"); tpu7x's XLA counts 84-237 MiB beyond its assignment, fitted as
# three more (BENCHMARKS.md, "Prefill on tpu7x").
PREFILL_TOKEN_ROWS_IN_HBM = {"v5p": 6, "tpu7x": 7}
# The same in a decode call, fitted to issue 16's table of decode calls (BENCHMARKS.md, "Decode on a TPU: what
# grows with the layers", and "Sampling a row a device").
DECODE_BYTES_PER_LAYER = 13 << 17  # 1.625 MiB
# The largest decode-call buffer the compiler keeps in on-chip memory, by chip (others: none; tpu7x kept none even
# at 24.5 MiB): one of sampling's row buffers, or one layer's window re-laid for attention.
ON_CHIP_BUFFER_BYTES = {"v5e": 32 << 20, "v6e": 32 << 20, "v5p": 8 << 20}
# A decode call's sampling holds float32 buffers of a chip's share of the rows over the whole vocabulary (the
# engine's `sampling_rows`): the logits, the sort's keys and indices, the noisy logits. Where each fits on chip,
# one is in HBM and the rest on chip; where not, SAMPLING_ROW_BUFFERS of them are in HBM at once (others: 4). Read
# off buffer dumps: BENCHMARKS.md, "Sampling a row a device".
SAMPLING_ROW_BUFFERS = {"v5e": 3, "v6e": 4, "v5p": 4, "tpu7x": 5}


class PlanError(ValueError):
    """A run that cannot fit its chips; the message says which setting to change."""


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes one chip needs for a run."""

    weights: int
    kv_cache: int
    decode_working: int
    prefill_working: int
    pool_tokens: int  # positions the full-attention layers' pool holds on the chip

    @property
    def working(self) -> int:
        """The working memory of the larger call."""
        return max(self.decode_working, self.prefill_working)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.working


def kv_cache_per_chip(
    cfg: ModelConfig, sizes: Mapping[str, int], max_slots: int, max_len: int, pool_tokens: int, dtype,
    rings: bool = True,
) -> int:
    kv_split = sizes["tensor"] if cfg.num_kv_heads % sizes["tensor"] == 0 else 1
    return cache_bytes(cfg, max_slots, max_len, pool_tokens, dtype, rings) // (sizes["data"] * kv_split)


def _round_up(count: int, multiple: int) -> int:
    return -(-count // multiple) * multiple


def retiled_weights_per_chip(placements: Sequence[Placement], sizes: Mapping[str, int], dtype) -> int:
    """The bytes of the bf16 weights that a decode call on tpu7x copies from the parameters' (8, 128) tiles into
    the (16, 128) tiles its matmuls read, every layer's at once, before the call's loop: each matrix a matmul reads
    (`MATMUL_CONTRACTED_DIMS`) whose contracted dimensions on a chip come to a multiple of 16 rows (the experts'
    `down` at `tensor` 8, 360 rows, is read as it is). Found in XLA's buffer assignment (BENCHMARKS.md)."""
    if np.dtype(dtype).itemsize != 2:
        return 0
    total = 0
    for placement in placements:
        contracted_dims = MATMUL_CONTRACTED_DIMS.get(placement.name.rsplit(".", 1)[-1])
        if contracted_dims is None:
            continue
        divisors = [*spec_divisor(placement.spec, sizes), *[1] * len(placement.shape)]
        rows = math.prod(placement.shape[dim] // divisors[dim] for dim in contracted_dims)
        total += placement.bytes_per_device if rows % TPU7X_BF16_TILE_ROWS == 0 else 0
    return total


def sampling_rows_per_chip(sizes: Mapping[str, int], max_slots: int, vocab_size: int) -> int:
    """The rows of logits one chip samples in a decode step: its share of the slots over every device where they
    divide, else over `data` (`sharding`'s rule for `sampling_rows`)."""
    spec = logical_to_spec(("sampling_rows", None), (max_slots, vocab_size), sizes)
    return max_slots // spec_divisor(spec, sizes)[0]


def _sampling_bytes(chip: str, row_buffer: int) -> int:
    """The bytes of HBM a decode step's sampling holds on `chip`, its buffers `row_buffer` bytes each."""
    if row_buffer <= ON_CHIP_BUFFER_BYTES.get(chip, 0):
        return row_buffer
    return SAMPLING_ROW_BUFFERS.get(chip, 4) * row_buffer


def _relaid_windows_bytes(
    cfg: ModelConfig, sizes: Mapping[str, int], max_slots: int, max_len: int, dtype, chip: str
) -> int:  # fmt: skip
    """The bytes of HBM that the sliding layers' windows, re-laid for attention, take on `chip`: none where a
    layer's fits on chip, else every layer's."""
    windows = kv_cache_per_chip(cfg, sizes, max_slots, max_len, 0, dtype)
    sliding_layers = sum(cfg.window(layer) is not None for layer in range(cfg.num_layers))
    return 0 if windows <= sliding_layers * ON_CHIP_BUFFER_BYTES.get(chip, 0) else windows


def decode_working_per_chip(
    cfg: ModelConfig, sizes: Mapping[str, int], max_slots: int, max_len: int, dtype, rings: bool = True,
    retiled_weights: int = 0, chip: str = "",
) -> int:  # fmt: skip
    """The decode call's temporaries on one chip, as `chip`'s compiler (a CHIPS name) lays them out:
    DECODE_BYTES_PER_LAYER a layer, the weights re-tiled for the call (`retiled_weights` bytes: tpu7x's),
    sampling's float32 rows of the whole vocabulary, a chip's share of the slots (`sampling_rows_per_chip`;
    `_sampling_bytes`), the sliding layers' windows (`rings`) re-laid for attention where they do not fit on chip,
    and each layer's experts' down bias masked to one device of `tensor`, twice. The pool is read in place. Rows
    of `hidden_size` are padded to the 128 lanes."""
    row_buffer = sampling_rows_per_chip(sizes, max_slots, cfg.vocab_size) * cfg.vocab_size * F32
    down_bias = cfg.num_experts // sizes["expert"] * _round_up(cfg.hidden_size, LANES) * np.dtype(dtype).itemsize
    layers = cfg.num_layers * (DECODE_BYTES_PER_LAYER + 2 * down_bias)
    windows = _relaid_windows_bytes(cfg, sizes, max_slots, max_len, dtype, chip) if rings else 0
    return layers + retiled_weights + _sampling_bytes(chip, row_buffer) + windows


def prefill_working_per_chip(
    cfg: ModelConfig, sizes: Mapping[str, int], max_slots: int, max_len: int, prefill_tokens: int, dtype,
    packed_experts: bool = False, chip: str = "", retiled_gate_up: int = 0,
) -> int:  # fmt: skip
    """The largest prefill call's temporaries on one chip (prompt pieces of at most `prefill_tokens` tokens in
    all, a row or more per data shard), as `chip`'s compiler lays them out: buffers of every token's rows
    (PREFILL_TOKEN_ROWS_IN_HBM; on most chips 4: the residual stream before and after its sum over the mesh, the
    experts' output, and one more, by which XLA's temporaries exceed its buffer assignment), and one chunk of
    tokens in the experts (`model.expert_chunk_tokens`): its token copies in their experts' order and the
    experts' output rows, for packed experts (the TPU kernel) rows padded to whole row blocks
    (`model.block_layout`) in and out; and PREFILL_BYTES_PER_LAYER a layer. Rows of `hidden_size` are padded to
    the 128 lanes. On tpu7x, where the experts loop over chunks, two chunks' buffers and a layer's bf16 `gate_up`
    re-tiled for the loop (`retiled_gate_up` bytes); in one chunk, bf16 experts' token copies in both tilings."""
    data = sizes["data"]
    piece = min(max(1, prefill_tokens // data), max_len)
    rows = math.ceil(min(max_slots, max(data, prefill_tokens // piece)) / data)
    tokens = rows * piece
    row_bytes = _round_up(cfg.hidden_size, LANES) * np.dtype(dtype).itemsize
    copies = min(tokens, expert_chunk_tokens(cfg)) * cfg.experts_per_token
    expert_rows = copies
    if packed_experts:
        rows_a_block, blocks = block_layout(copies, cfg.num_experts // sizes["expert"], KERNEL_BLOCK_ROWS)
        expert_rows = 2 * rows_a_block * blocks
    token_rows = PREFILL_TOKEN_ROWS_IN_HBM.get(chip, 4) * tokens
    chunk = (copies + expert_rows) * row_bytes
    working = token_rows * row_bytes + chunk + cfg.num_layers * PREFILL_BYTES_PER_LAYER
    if chip != "tpu7x":
        return working
    chunks_loop = tokens > expert_chunk_tokens(cfg)
    return working + _tpu7x_prefill_copies(chunk, copies * row_bytes, chunks_loop, packed_experts, retiled_gate_up)


def _tpu7x_prefill_copies(chunk: int, token_copies: int, chunks_loop: bool, packed_experts: bool,
                          retiled_gate_up: int) -> int:  # fmt: skip
    """What tpu7x's prefill calls hold beyond other chips' (buffer dumps, BENCHMARKS.md "Prefill on tpu7x"): where
    the experts loop over chunks, a second chunk's buffers and a layer's `gate_up` re-tiled into (16, 128) tiles
    for the loop; in one chunk, bf16 experts' token copies in (16, 128) tiles beside (8, 128) ones."""
    if chunks_loop:
        return chunk + retiled_gate_up
    return 0 if packed_experts else token_copies


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
    chip: str = "",
    steps_per_call: int = 1,
) -> MemoryPlan:
    """The plan of a run on `chip` (a CHIPS name; its compiler's own temporaries: tpu7x's re-tiled weights,
    copied before a decode call's loop of `steps_per_call` steps, none for a single step) whose pool has
    (page_size, kv_pages) `pool` (`engine.page_pool`; None: the default), the sliding layers keeping a window
    per slot (`rings`) or, with prefix caching, a pool too."""
    placements = weight_placements(cfg, sizes, dtype, packed_experts=packed_experts)
    weights = sum(p.bytes_per_device for p in placements)
    retiled = retiled_weights_per_chip(placements, sizes, dtype) if chip == "tpu7x" and steps_per_call > 1 else 0
    gate_up = [p for p in placements if p.name == "layers.0.mlp.gate_up"]
    retiled_gate_up = retiled_weights_per_chip(gate_up, sizes, dtype) if chip == "tpu7x" else 0
    pool = pool or page_pool(max_slots, max_len)
    page_size, kv_pages = pool
    return MemoryPlan(
        weights=weights,
        kv_cache=kv_cache_per_chip(cfg, sizes, max_slots, max_len, page_size * kv_pages, dtype, rings),
        decode_working=decode_working_per_chip(cfg, sizes, max_slots, max_len, dtype, rings, retiled, chip),
        prefill_working=prefill_working_per_chip(cfg, sizes, max_slots, max_len, prefill_tokens, dtype,
                                                 packed_experts, chip, retiled_gate_up),
        pool_tokens=page_size * kv_pages // sizes["data"],
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


def render(plans: Mapping[str, MemoryPlan], sizes: Mapping[str, int]) -> str:
    """The plans of one run on each chip of CHIPS (`plans`, by chip), and whether it fits each."""
    mesh = ", ".join(f"{a}={sizes[a]}" for a in MESH_AXES)
    plan = next(iter(plans.values()))  # weights, cache and pool are the same on every chip
    lines = [
        f"per chip on mesh ({mesh}): weights {plan.weights / GiB:.2f} GiB, KV cache {plan.kv_cache / GiB:.2f} GiB",
        f"the KV pool holds {plan.pool_tokens:,} tokens per chip",
        f"{'chip':<6} {'memory':>9} {'decode':>8} {'prefill':>8} {'total':>8} {'used':>6}  fits  (GiB: working, total)",
    ]
    for chip, chip_plan in plans.items():
        used = chip_plan.total / CHIPS[chip]
        figures = "".join(f" {count / GiB:>8.2f}" for count in
                          (chip_plan.decode_working, chip_plan.prefill_working, chip_plan.total))
        lines.append(f"{chip:<6} {CHIPS[chip] / GiB:>6.0f} GiB{figures} {used:>6.0%}  {'yes' if used <= 1 else 'no'}")
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
        return chip_name(device.device_kind) or device.device_kind, int(stats["bytes_limit"])
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
        options = settings.plan_options(run_settings)
        print(render({chip: plan_memory(cfg, sizes, pool=pool, chip=chip, **options) for chip in CHIPS}, sizes))

    app.run(run, argv=list(argv) if argv is not None else None)


if __name__ == "__main__":
    main()
