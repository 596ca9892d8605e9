"""MXFP4, the published checkpoint's format for expert weights.

A tensor `W` of shape (..., N) is stored as `blocks` (..., N/32, 16) uint8 and `scales` (..., N/32) uint8:
each byte holds two FP4 (e2m1) codes, low nibble first, and each group of 32 values shares one scale,
so that value = FP4_VALUES[code] * 2**(scale - 127).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

FP4_VALUES = np.array(
    [+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=np.float32,
)
VALUES_PER_BLOCK = 32
SCALE_BIAS = 127


def _check_layout(blocks_shape: tuple[int, ...], scales_shape: tuple[int, ...]) -> None:
    if blocks_shape[-1] != VALUES_PER_BLOCK // 2 or blocks_shape[:-1] != scales_shape:
        raise ValueError(
            f"MXFP4 blocks {blocks_shape} and scales {scales_shape} do not match: "
            f"expected blocks (..., G, {VALUES_PER_BLOCK // 2}) and scales (..., G)"
        )


def decode_np(blocks: np.ndarray, scales: np.ndarray, dtype: np.dtype = np.float32) -> np.ndarray:
    """Dequantizes on the host: (..., G, 16) blocks and (..., G) scales -> (..., G * 32) values."""
    _check_layout(blocks.shape, scales.shape)
    blocks = np.asarray(blocks, np.uint8)
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1)  # low nibble first
    exponents = np.asarray(scales, np.int32)[..., None, None] - SCALE_BIAS
    with np.errstate(over="ignore"):  # scale 255 overflows float32 to inf, as the reference does
        values = np.ldexp(FP4_VALUES[codes], exponents)
    return values.reshape(*scales.shape[:-1], -1).astype(dtype)


def decode(blocks: jax.Array, scales: jax.Array, dtype: jnp.dtype = jnp.bfloat16) -> jax.Array:
    """Dequantizes on the device; same layout and values as `decode_np`.

    XLA flushes subnormal floats to zero, so the two agree bit for bit wherever the value is a normal
    float (every scale >= 2, which includes every scale a trained checkpoint holds).
    """
    _check_layout(blocks.shape, scales.shape)
    codes = jnp.stack([blocks & 0x0F, blocks >> 4], axis=-1)
    exponents = scales.astype(jnp.int32)[..., None, None] - SCALE_BIAS
    values = jnp.ldexp(jnp.asarray(FP4_VALUES)[codes], exponents)
    return values.reshape(*scales.shape[:-1], -1).astype(dtype)


def encode_np(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantizes (..., N) values, N a multiple of 32, to the nearest MXFP4 codes: returns (blocks, scales).

    Each group's scale is the smallest power of two that brings the group's largest magnitude within 6,
    the largest FP4 value.
    """
    values = np.asarray(values, np.float32)
    if values.shape[-1] % VALUES_PER_BLOCK:
        raise ValueError(f"last axis {values.shape[-1]} is not a multiple of {VALUES_PER_BLOCK}")
    groups = values.reshape(*values.shape[:-1], -1, VALUES_PER_BLOCK)
    peak = np.max(np.abs(groups), axis=-1)
    exponents = np.ceil(np.log2(np.maximum(peak, np.finfo(np.float32).tiny) / FP4_VALUES.max()))
    exponents = np.clip(exponents, -SCALE_BIAS, 255 - SCALE_BIAS).astype(np.int32)
    scaled = np.ldexp(groups, -exponents[..., None])
    # The nearest of the 8 magnitudes (the lower one on a tie), then the sign bit; zero is always +0.
    magnitudes = FP4_VALUES[:8]
    codes = np.searchsorted((magnitudes[1:] + magnitudes[:-1]) / 2, np.abs(scaled)).astype(np.uint8)
    codes |= ((scaled < 0) & (codes > 0)).astype(np.uint8) << 3
    pairs = codes.reshape(*codes.shape[:-1], VALUES_PER_BLOCK // 2, 2)
    blocks = pairs[..., 0] | (pairs[..., 1] << 4)
    return blocks.astype(np.uint8), (exponents + SCALE_BIAS).astype(np.uint8)


# Bit layouts of the floats the codes decode to: (integer of the same width, mantissa bits).
_FLOAT_BITS = {jnp.dtype(jnp.bfloat16): (jnp.int16, 7), jnp.dtype(jnp.float32): (jnp.int32, 23)}


def fp4_to_float(codes: jax.Array, scales: jax.Array, dtype) -> jax.Array:
    """FP4 (e2m1) codes 0..15 (int32) times 2**(scale - 127), as `dtype` (bfloat16 or float32), built bit by
    bit: FP4 value (1 + m/2) * 2**(e - 1) (e > 0) or m/2 (e = 0) has exponent field e - 1 + scale (scale - 1)
    and its one mantissa bit on top. A result below the normal range is zero (XLA flushes subnormals, as
    `mxfp4.decode` does), one above it infinite (scale 255)."""
    integer, mantissa_bits = _FLOAT_BITS[jnp.dtype(dtype)]
    exponent, mantissa = (codes >> 1) & 3, codes & 1
    normal = exponent > 0
    field = jnp.where(normal, exponent - 1, -1) + scales
    top_bit = jnp.where(normal & (field < 255), mantissa << (mantissa_bits - 1), 0)
    magnitude = (jnp.minimum(field, 255) << mantissa_bits) | top_bit
    magnitude = jnp.where((codes & 7 == 0) | (field <= 0), 0, magnitude)
    bits = magnitude | ((codes & 8) << (jnp.dtype(integer).itemsize * 8 - 4))
    return jax.lax.bitcast_convert_type(bits.astype(integer), dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PackedMatrices:
    """A stack of matrices [E, in, out] kept as the checkpoint stores them: `blocks` [E, out, in/32, 16] and
    `scales` [E, out, in/32], uint8 (each matrix transposed, its input axis packed)."""

    blocks: jax.Array
    scales: jax.Array

    @property
    def shape(self) -> tuple[int, int, int]:
        """The shape of the matrices it holds, [E, in, out]."""
        count, fan_out, groups, _ = self.blocks.shape
        return count, groups * VALUES_PER_BLOCK, fan_out

    def matrix(self, index: jax.Array | int, dtype: jnp.dtype) -> jax.Array:
        """Matrix `index` [in, out], dequantized."""
        return decode(self.blocks[index], self.scales[index], dtype).T
