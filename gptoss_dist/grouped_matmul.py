"""A grouped matmul for the experts on GPUs: rows in blocks, each block multiplied by its own expert's matrix.

XLA has no GPU kernel for this: `ragged_dot` becomes a dense matmul over every expert, and gathering the
routed experts' weights copies them before use. This Pallas (Triton) kernel reads each used expert's matrix
in place, tile by tile, once per block of rows, and skips blocks no row uses, so a decode step reads only the
routed experts.

At a few tokens a step there are few blocks, and each program would stream a long column strip in a chain of
dependent loads: the contraction is then split over several programs (split-K), whose float32 partial sums
are added after. Packed (MXFP4) matrices are dequantized a tile at a time inside the loop: the float's bit
pattern is built from each FP4 code and its group's scale with integer operations (sign, exponent and the
one mantissa bit in place), so a tile costs a few integer instructions and no multiply.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from gptoss_dist import mxfp4

F32 = jnp.float32
CODE_BYTES = mxfp4.VALUES_PER_BLOCK // 2  # bytes of FP4 codes per scale group
# Programs enough to fill an H100/H200 (132 SMs) many times over, the contraction split until about this many.
TARGET_PROGRAMS = 2048
MAX_SPLIT = 16


@dataclasses.dataclass(frozen=True)
class Tiles:
    """How the kernel cuts its work: `out` output columns per program; `inner` inputs per loop step (dense)
    or scale groups per loop step (packed); `split` programs sharing each column strip's contraction
    (split-K); Triton's warps per program and software-pipeline stages."""

    out: int
    inner: int
    split: int = 1
    warps: int = 4
    stages: int = 3


def default_tiles(num_blocks: int, block_rows: int, fan_in: int, fan_out: int, packed: bool) -> Tiles:
    """Tiles for a call of `num_blocks` blocks of `block_rows` rows: wide column tiles for large blocks, and
    the contraction split until there are about TARGET_PROGRAMS programs (each then runs a shorter chain)."""
    out = _tile(fan_out, 128 if block_rows >= 64 else 64)
    inner = _power_of_2_divisor(fan_in // mxfp4.VALUES_PER_BLOCK, 4) if packed else _tile(fan_in, 64)
    steps = fan_in // (inner * mxfp4.VALUES_PER_BLOCK if packed else inner)
    programs = num_blocks * (fan_out // out)
    splits = [s for s in range(1, MAX_SPLIT + 1) if steps % s == 0 and programs * s <= TARGET_PROGRAMS]
    warps = 8 if block_rows * out >= 128 * 128 else 4
    return Tiles(out=out, inner=inner, split=max(splits, default=1), warps=warps)


def grouped_matmul(
    x: jax.Array,
    weights: jax.Array | mxfp4.PackedMatrices,
    bias: jax.Array,
    block_expert: jax.Array,
    block_rows: int,
    *,
    tiles: Tiles | None = None,
    interpret: bool = False,
) -> jax.Array:
    """x [blocks * block_rows, in] @ weights[e] + bias[e] for each block's expert e = block_expert[b].

    `weights` [E, in, out] is dense or MXFP4-packed; bias [E, out]. Blocks whose expert is out of range
    (>= E) are skipped: their output rows are left unwritten. Returns [blocks * block_rows, out] in x's
    dtype, accumulated in float32. `tiles` defaults to `default_tiles`; `interpret` runs the kernel on any
    backend (for tests).
    """
    num_experts, fan_in, fan_out = weights.shape
    num_blocks = block_expert.shape[0]
    packed = isinstance(weights, mxfp4.PackedMatrices)
    tiles = tiles or default_tiles(num_blocks, block_rows, fan_in, fan_out, packed)
    if packed:
        operands = (x[:, 0::2], x[:, 1::2], weights.blocks.reshape(num_experts, fan_out, -1), weights.scales)
        step = functools.partial(_packed_step, groups=tiles.inner, dtype=x.dtype)
        steps = fan_in // mxfp4.VALUES_PER_BLOCK // tiles.inner
    else:
        operands = (x, weights)
        step, steps = functools.partial(_dense_step, tile_in=tiles.inner), fan_in // tiles.inner
    if steps * tiles.inner * (mxfp4.VALUES_PER_BLOCK if packed else 1) != fan_in or steps % tiles.split:
        raise ValueError(f"{tiles} does not divide a contraction of {fan_in}")
    kernel = functools.partial(
        _kernel, step, num_experts=num_experts, block_rows=block_rows, tile_out=tiles.out,
        steps=steps // tiles.split,
    )  # fmt: skip
    column_tiles = fan_out // tiles.out
    # split-K: each split writes its own float32 partial sums, side by side along the columns
    out_dtype = x.dtype if tiles.split == 1 else F32
    out = pl.pallas_call(
        kernel,
        grid=(num_blocks, column_tiles, tiles.split),
        out_specs=pl.BlockSpec((block_rows, tiles.out), lambda b, t, s: (b, s * column_tiles + t)),
        out_shape=jax.ShapeDtypeStruct((num_blocks * block_rows, tiles.split * fan_out), out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=tiles.warps, num_stages=tiles.stages),
        interpret=interpret,
    )(block_expert, *operands, bias)
    if tiles.split == 1:
        return out
    return out.reshape(-1, tiles.split, fan_out).sum(axis=1).astype(x.dtype)


def _tile(size: int, largest: int) -> int:
    """The largest power of two up to `largest` that divides `size` (Triton tiles are powers of two)."""
    tile = largest
    while size % tile:
        tile //= 2
    if tile < 16:
        raise ValueError(f"dimension {size} has no power-of-two tile of at least 16")
    return tile


def _power_of_2_divisor(size: int, largest: int) -> int:
    """The largest power of two up to `largest` that divides `size`."""
    divisor = largest
    while size % divisor:
        divisor //= 2
    return divisor


def _kernel(step, expert_ref, *refs, num_experts, block_rows, tile_out, steps):
    """One program: block b's rows times column tile t of its expert's matrix over split s of the inputs,
    plus the bias (in split 0); `step(i, acc, expert, rows, cols, *operand_refs)` adds the product over the
    i-th stretch of inputs to acc. A block no row uses is skipped."""
    *operand_refs, bias_ref, out_ref = refs
    block, tile, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    expert = expert_ref[block]
    rows, cols = pl.ds(block * block_rows, block_rows), pl.ds(tile * tile_out, tile_out)

    @pl.when(expert < num_experts)
    def _():
        def accumulate(i, acc):
            return step(split * steps + i, acc, expert, rows, cols, *operand_refs)

        acc = jax.lax.fori_loop(0, steps, accumulate, jnp.zeros((block_rows, tile_out), F32))
        bias = jnp.where(split == 0, bias_ref[expert, cols].astype(F32), 0.0)
        out_ref[...] = (acc + bias[None, :]).astype(out_ref.dtype)


def _dense_step(i, acc, expert, rows, cols, x_ref, w_ref, *, tile_in):
    inner = pl.ds(pl.multiple_of(i * tile_in, tile_in), tile_in)
    return acc + jnp.dot(x_ref[rows, inner], w_ref[expert, inner, cols], preferred_element_type=F32)


def _packed_step(i, acc, expert, rows, cols, x_even_ref, x_odd_ref, codes_ref, scales_ref, *, groups, dtype):
    """Packed matrices: codes [E, out, in/2] (low nibble: even inputs, high nibble: odd ones) and scales
    [E, out, in/32]; x comes split into its even and odd input columns, to meet the two nibbles. A step
    decodes `groups` scale groups of a column tile, each code with its group's scale."""
    width = groups * CODE_BYTES
    pairs = pl.ds(pl.multiple_of(i * width, width), width)
    codes = codes_ref[expert, cols, pairs].astype(jnp.int32)  # [tile_out, width]
    scales = scales_ref[expert, cols, pl.ds(i * groups, groups)].astype(jnp.int32)  # [tile_out, groups]
    scales = jnp.broadcast_to(scales[:, :, None], (*scales.shape, CODE_BYTES)).reshape(codes.shape)
    contract = (((1,), (1,)), ((), ()))
    for x_ref, nibble in ((x_even_ref, codes & 0xF), (x_odd_ref, codes >> 4)):
        values = mxfp4.fp4_to_float(nibble, scales, dtype)
        acc += jax.lax.dot_general(x_ref[rows, pairs], values, contract, preferred_element_type=F32)
    return acc
