"""A grouped matmul for the experts on TPUs (Pallas/Mosaic): rows in blocks, each block multiplied by its own
expert's matrix, dense or MXFP4-packed as the checkpoint stores it.

The grid runs column tiles outside and row blocks inside. Each block's expert comes in by scalar prefetch and
picks the weight tile in the index map; rows are sorted by expert, so consecutive blocks of one expert ask for
the same tile and Pallas does not fetch it again: each used expert's tile is read from HBM once per call, and
no other expert's. Blocks no row uses (all at the end) ask for the last used expert's tile, so they read
nothing new, and write zeros.

Packed matrices stay packed in HBM: a tile of FP4 codes [in/2, tile_out] and its scales [in/32, tile_out]
is dequantized in VMEM, once per expert and column tile (not once per block), into a scratch buffer in the
compute dtype, with `mxfp4.fp4_to_float` (the values `mxfp4.decode` gives). The kernel reads the codes with
the output axis minor: that is how XLA lays out the checkpoint's [E, out, in/32, 16] uint8 blocks on a TPU
(a 16-byte minor axis would be padded to 128 lanes), so the transpose to [E, in/2, out] is free; with the
input axis minor instead, XLA copied every expert's codes before each call. The scales [E, out, in/32] are
read as [E, in/32, out], one expert's [in/32, tile_out] a block, like the codes: XLA's default layout for
them on a TPU is [in/32, E, out], where no block can pick one expert (a tile then held every expert's
scales, a third of a 20B decode step's bytes at one token), so `sharding.param_formats` pins them
expert-major (`SCALES_MAJOR_TO_MINOR`), and the transpose is free.

GPT-OSS's dimensions (2880 = 2^6 * 45) have no divisor that is a multiple of 128, so the contraction is one
block of the full dimension (allowed on TPUs) and the last column tile is partial: its out-of-range columns
are computed from padding and dropped on the write.

Why not JAX's megablox `gmm`: it is dense only (the packed layout needs the decode inside the kernel), and it
masks rows of several groups inside shared row tiles instead of taking `row_blocks`' padded blocks. Its
pattern (scalar-prefetched group metadata in the index maps, the revisited axis "arbitrary") is the one
used here. jax-llm-examples' `decode_ragged_dot` keeps all rows in one block, which overflows VMEM in
prefill (issue 17); here `row_blocks` picks 16-row blocks at decode and up to 128 in prefill.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from gptoss_dist import mxfp4

F32 = jnp.float32
CODE_BYTES = mxfp4.VALUES_PER_BLOCK // 2  # bytes of FP4 codes per scale group
# Output columns per tile: a multiple of 128 (the lane width). At 512, a bf16 call's double-buffered blocks
# (codes, scales, x, out) and the decoded tile take about 6.5 MB of VMEM at fan-in 2880 and 128-row blocks,
# inside every generation's default scoped limit (16 MB on v5e and v5p, 32 MB on v6e, tpu7x).
TILE_OUT = 512
DECODE_GROUPS = 8  # scale groups (of 16 code rows) dequantized at a time, to keep the int32 temporaries small
KERNEL_NAME = "experts_grouped_matmul"  # the Mosaic kernel's name in the compiled program
# The layout of the scales [E, out, in/32] the kernel reads in place (`sharding.param_formats` pins it):
# expert-major, output minor, so that a block is one expert's [in/32, tile_out].
SCALES_MAJOR_TO_MINOR = (0, 2, 1)


def grouped_matmul(
    x: jax.Array,
    weights: jax.Array | mxfp4.PackedMatrices,
    bias: jax.Array,
    block_expert: jax.Array,
    block_rows: int,
    *,
    tile_out: int = TILE_OUT,
    interpret: bool = False,
) -> jax.Array:
    """x [blocks * block_rows, in] @ weights[e] + bias[e] for each block's expert e = block_expert[b].

    `weights` [E, in, out] is dense or MXFP4-packed; bias [E, out]. Blocks whose expert is out of range
    (>= E) read no weights and give zeros. Returns [blocks * block_rows, out] in x's dtype, accumulated in
    float32. `interpret` runs the kernel with Pallas' interpreter on any backend (for tests).
    """
    num_experts, fan_in, fan_out = weights.shape
    num_blocks = block_expert.shape[0]
    if x.shape != (num_blocks * block_rows, fan_in):
        raise ValueError(f"x {x.shape} is not {num_blocks} blocks of {block_rows} rows by {fan_in} inputs")
    tile_out = min(tile_out, fan_out)
    used = block_expert < num_experts
    # Blocks are sorted by expert, unused ones last: those fetch the last used expert's tile (no new read).
    fetch = jnp.where(used, block_expert, jnp.max(jnp.where(used, block_expert, 0))).astype(jnp.int32)

    def rows(t, b, *_):
        return b, 0

    def columns_of_expert(t, b, expert, fetch):  # weights [E, in, out], bias [E, 1, out]
        return fetch[b], 0, t

    if isinstance(weights, mxfp4.PackedMatrices):
        # [E, in/2, out]: the layout a TPU keeps the checkpoint's [E, out, in/32, 16] in (output axis minor)
        codes = weights.blocks.transpose(0, 2, 3, 1).reshape(num_experts, fan_in // 2, fan_out)
        # [E, in/32, out]: the layout `sharding.param_formats` pins the scales [E, out, in/32] to on a TPU
        scales = weights.scales.transpose(0, 2, 1)
        operands = (x[:, 0::2], x[:, 1::2], _in_hbm(codes, interpret), _in_hbm(scales, interpret))
        half = pl.BlockSpec((block_rows, fan_in // 2), rows)
        in_specs = [
            half, half,
            pl.BlockSpec((None, fan_in // 2, tile_out), columns_of_expert),
            pl.BlockSpec((None, fan_in // mxfp4.VALUES_PER_BLOCK, tile_out), columns_of_expert),
        ]  # fmt: skip
        product = _packed_product
        scratch = [pltpu.VMEM((2, fan_in // 2, tile_out), x.dtype)]  # the decoded even and odd inputs
    else:
        operands = (x, _in_hbm(weights, interpret))
        in_specs = [pl.BlockSpec((block_rows, fan_in), rows), pl.BlockSpec((None, fan_in, tile_out), columns_of_expert)]
        product, scratch = _dense_product, []
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(pl.cdiv(fan_out, tile_out), num_blocks),
        in_specs=[*in_specs, pl.BlockSpec((None, 1, tile_out), columns_of_expert)],
        out_specs=pl.BlockSpec((block_rows, tile_out), lambda t, b, *_: (b, t)),
        scratch_shapes=scratch,
    )
    return pl.pallas_call(
        functools.partial(_kernel, product, num_experts=num_experts, num_scratch=len(scratch)),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((num_blocks * block_rows, fan_out), x.dtype),
        # the block axis carries the decoded tile from one block to the next: it runs in order
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
        name=KERNEL_NAME,
    )(block_expert.astype(jnp.int32), fetch, *operands, _in_hbm(bias.reshape(num_experts, 1, fan_out), interpret))


def _in_hbm(per_expert: jax.Array, interpret: bool) -> jax.Array:
    """Keeps a per-expert operand in HBM for the call. Else XLA may copy the whole array, every expert's, into
    VMEM before the call when it fits (seen in a compiled decode step: a layer's scales and gate_up codes),
    reading all of it where the kernel reads only the used experts' tiles. Pallas' interpreter has no memory
    spaces."""
    return per_expert if interpret else pltpu.with_memory_space_constraint(per_expert, pltpu.HBM)


def _kernel(product, expert_ref, fetch_ref, *refs, num_experts, num_scratch):
    """One row block times one column tile of its expert's matrix, plus the bias; zeros for an unused block.
    `product(block, fetch_ref, *operand_refs, *scratch_refs)` returns the float32 product."""
    *operand_refs, bias_ref, out_ref = refs[: len(refs) - num_scratch]
    scratch = refs[len(refs) - num_scratch :]
    block = pl.program_id(1)

    @pl.when(expert_ref[block] < num_experts)
    def _():
        acc = product(block, fetch_ref, *operand_refs, *scratch)
        out_ref[...] = (acc + bias_ref[...].astype(F32)).astype(out_ref.dtype)

    @pl.when(expert_ref[block] >= num_experts)
    def _():
        out_ref[...] = jnp.zeros(out_ref.shape, out_ref.dtype)


def _dense_product(block, fetch_ref, x_ref, w_ref):
    return jnp.dot(x_ref[...], w_ref[...].astype(x_ref.dtype), preferred_element_type=F32)


def _packed_product(block, fetch_ref, x_even_ref, x_odd_ref, codes_ref, scales_ref, decoded_ref):
    """x split into its even and odd inputs (the low and high nibbles) times the decoded tile, which is
    decoded again only where this block's tile differs from the previous block's."""
    new_tile = (block == 0) | (fetch_ref[block] != fetch_ref[jnp.maximum(block - 1, 0)])
    pl.when(new_tile)(functools.partial(_decode_tile, codes_ref, scales_ref, decoded_ref))
    even = jnp.dot(x_even_ref[...], decoded_ref[0], preferred_element_type=F32)
    return even + jnp.dot(x_odd_ref[...], decoded_ref[1], preferred_element_type=F32)


def _decode_tile(codes_ref, scales_ref, decoded_ref):
    """codes [in/2, tile_out] and scales [in/32, tile_out] of one expert -> decoded [2, in/2, tile_out]
    (even inputs from the low nibbles, odd from the high), DECODE_GROUPS scale groups at a time (aligned
    loads: 128 rows of codes), then the groups left over."""
    groups = scales_ref.shape[0]
    whole, left = divmod(groups, DECODE_GROUPS)

    def decode_groups(first, count):
        codes = codes_ref[pl.ds(first * CODE_BYTES, count * CODE_BYTES), :].astype(jnp.int32)
        scales = scales_ref[pl.ds(first, count), :].astype(jnp.int32)  # [count, tile_out]
        scales = jnp.broadcast_to(scales[:, None, :], (count, CODE_BYTES, scales.shape[1])).reshape(codes.shape)  # fmt: skip
        for half, nibble in enumerate((codes & 0xF, codes >> 4)):
            values = mxfp4.fp4_to_float(nibble, scales, F32).astype(decoded_ref.dtype)
            decoded_ref[half, pl.ds(first * CODE_BYTES, count * CODE_BYTES), :] = values

    def decode_chunk(i, carry):
        decode_groups(pl.multiple_of(i * DECODE_GROUPS, DECODE_GROUPS), DECODE_GROUPS)
        return carry

    if whole:
        jax.lax.fori_loop(0, whole, decode_chunk, 0)
    if left:
        decode_groups(whole * DECODE_GROUPS, left)
