"""A grouped matmul for the experts on GPUs: rows in blocks, each block multiplied by its own expert's matrix.

XLA has no GPU kernel for this: `ragged_dot` becomes a dense matmul over every expert, and gathering the
routed experts' weights copies them before use. This Pallas (Triton) kernel reads each used expert's matrix
in place, tile by tile, once per block of rows, and skips blocks no row uses, so a decode step reads only the
routed experts. Packed (MXFP4) matrices are dequantized a tile at a time inside the loop: the codes are
decoded in registers, multiplied as bf16, and each 32-value group's scale is applied to its partial sum.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from gptoss_dist import mxfp4

F32 = jnp.float32
CODE_BYTES = mxfp4.VALUES_PER_BLOCK // 2  # bytes of FP4 codes per scale group


def grouped_matmul(
    x: jax.Array,
    weights: jax.Array | mxfp4.PackedMatrices,
    bias: jax.Array,
    block_expert: jax.Array,
    block_rows: int,
    *,
    interpret: bool = False,
) -> jax.Array:
    """x [blocks * block_rows, in] @ weights[e] + bias[e] for each block's expert e = block_expert[b].

    `weights` [E, in, out] is dense or MXFP4-packed; bias [E, out]. Blocks whose expert is out of range
    (>= E) are skipped: their output rows are left unwritten. Returns [blocks * block_rows, out] in x's
    dtype, accumulated in float32. `interpret` runs the kernel on any backend (for tests).
    """
    num_experts, fan_in, fan_out = weights.shape
    tile_out = _tile(fan_out, 128 if block_rows >= 64 else 64)
    if isinstance(weights, mxfp4.PackedMatrices):
        groups = fan_in // mxfp4.VALUES_PER_BLOCK
        per_step = max(d for d in range(1, 9) if groups % d == 0)  # scale groups per loop step
        operands = (x[:, 0::2], x[:, 1::2], weights.blocks.reshape(num_experts, fan_out, -1), weights.scales)
        step, steps = functools.partial(_packed_step, groups_per_step=per_step), groups // per_step
    else:
        tile_in = _tile(fan_in, 64)
        operands = (x, weights)
        step, steps = functools.partial(_dense_step, tile_in=tile_in), fan_in // tile_in
    kernel = functools.partial(
        _kernel, step, num_experts=num_experts, block_rows=block_rows, tile_out=tile_out, steps=steps
    )
    num_blocks = block_expert.shape[0]
    return pl.pallas_call(
        kernel,
        grid=(num_blocks, fan_out // tile_out),
        out_specs=pl.BlockSpec((block_rows, tile_out), lambda b, t: (b, t)),
        out_shape=jax.ShapeDtypeStruct((num_blocks * block_rows, fan_out), x.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=8 if block_rows * tile_out >= 128 * 128 else 4, num_stages=3),
        interpret=interpret,
    )(block_expert, *operands, bias)


def _tile(size: int, largest: int) -> int:
    """The largest power of two up to `largest` that divides `size` (Triton tiles are powers of two)."""
    tile = largest
    while size % tile:
        tile //= 2
    if tile < 16:
        raise ValueError(f"dimension {size} has no power-of-two tile of at least 16")
    return tile


def _kernel(step, expert_ref, *refs, num_experts, block_rows, tile_out, steps):
    """One program: block b's rows times column tile t of its expert's matrix, plus the bias; `step(i, acc,
    expert, rows, cols, *operand_refs)` adds the product over the i-th stretch of inputs to acc. A block no
    row uses is skipped."""
    *operand_refs, bias_ref, out_ref = refs
    block, tile = pl.program_id(0), pl.program_id(1)
    expert = expert_ref[block]
    rows, cols = pl.ds(block * block_rows, block_rows), pl.ds(tile * tile_out, tile_out)

    @pl.when(expert < num_experts)
    def _():
        def accumulate(i, acc):
            return step(i, acc, expert, rows, cols, *operand_refs)

        acc = jax.lax.fori_loop(0, steps, accumulate, jnp.zeros((block_rows, tile_out), F32))
        out_ref[...] = (acc + bias_ref[expert, cols].astype(F32)[None, :]).astype(out_ref.dtype)


def _dense_step(i, acc, expert, rows, cols, x_ref, w_ref, *, tile_in):
    inner = pl.ds(pl.multiple_of(i * tile_in, tile_in), tile_in)
    return acc + jnp.dot(x_ref[rows, inner], w_ref[expert, inner, cols], preferred_element_type=F32)


def _packed_step(i, acc, expert, rows, cols, x_even_ref, x_odd_ref, codes_ref, scales_ref, *, groups_per_step):
    """Packed matrices: codes [E, out, in/2] (low nibble: even inputs, high nibble: odd ones) and scales
    [E, out, in/32]; x comes split into its even and odd input columns, to meet the two nibbles. Each scale
    group's partial product is scaled once, rather than every decoded value."""
    dtype = x_even_ref.dtype
    contract = (((1,), (1,)), ((), ()))
    for g in range(groups_per_step):
        group = i * groups_per_step + g
        pairs = pl.ds(pl.multiple_of(group * CODE_BYTES, CODE_BYTES), CODE_BYTES)
        codes = codes_ref[expert, cols, pairs].astype(jnp.int32)  # [tile_out, 16]
        even, odd = fp4_values(codes & 0xF).astype(dtype), fp4_values(codes >> 4).astype(dtype)
        partial = jax.lax.dot_general(x_even_ref[rows, pairs], even, contract, preferred_element_type=F32)
        partial += jax.lax.dot_general(x_odd_ref[rows, pairs], odd, contract, preferred_element_type=F32)
        scale = jnp.exp2(scales_ref[expert, cols, group].astype(F32) - mxfp4.SCALE_BIAS)
        acc = acc + partial * scale[None, :]
    return acc


def fp4_values(codes: jax.Array) -> jax.Array:
    """FP4 (e2m1) codes 0..15 -> float32 values (`mxfp4.FP4_VALUES`), by arithmetic rather than a table
    lookup, which a Triton kernel cannot do: |value| = mantissa/2 for exponent 0, else (2 + mantissa) *
    2**(exponent - 2); bit 3 is the sign."""
    exponent, mantissa = (codes >> 1) & 3, codes & 1
    twice = jnp.where(exponent == 0, mantissa, (2 + mantissa) << jnp.maximum(exponent - 1, 0))
    magnitude = twice.astype(F32) * 0.5
    return jnp.where(codes >= 8, -magnitude, magnitude)
