"""The expert kernels against the reference expert computation: one check, shared by the GPU kernel's tests
(`test_grouped_matmul.py`) and the TPU kernel's (`test_tpu_grouped_matmul.py`), both run interpreted."""

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from gptoss_dist import mxfp4
from gptoss_dist.model import row_blocks

EXPERTS = 4
# Largest error allowed, relative to the largest output: in float32 only the order of the sums differs; in
# bfloat16 the weights and the outputs are rounded to 8 bits of mantissa.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def expert_weights(rng: np.random.Generator, packed: bool, fan_in: int, fan_out: int):
    """(the kernel's weights, dense or MXFP4-packed; the same matrices dense [E, in, out] float32; biases
    [E, out] float32)."""
    if packed:
        blocks = rng.integers(0, 256, (EXPERTS, fan_out, fan_in // 32, 16), dtype=np.uint8)
        scales = rng.integers(120, 130, (EXPERTS, fan_out, fan_in // 32), dtype=np.uint8)
        dense = mxfp4.decode_np(blocks, scales).transpose(0, 2, 1)
        weights = mxfp4.PackedMatrices(jnp.asarray(blocks), jnp.asarray(scales))
    else:
        dense = rng.standard_normal((EXPERTS, fan_in, fan_out)).astype(np.float32)
        weights = jnp.asarray(dense)
    return weights, dense, rng.standard_normal((EXPERTS, fan_out)).astype(np.float32)


def check_kernel_matches_reference(
    matmul: Callable, group: np.ndarray, *, packed: bool, dtype, fan_in: int, fan_out: int
) -> None:
    """Rows routed by `group` (sorted by expert; EXPERTS for rows held elsewhere) through `matmul` (a grouped
    matmul called as (x, weights, bias, block_expert, block_rows)) give each row times its expert's matrix plus
    its bias, within the dtype's TOLERANCE, and zero for rows held elsewhere."""
    rng = np.random.default_rng(len(group))
    weights, dense, bias = expert_weights(rng, packed, fan_in, fan_out)
    x = np.asarray(jnp.asarray(rng.standard_normal((len(group), fan_in)), dtype), np.float32)  # as the kernel sees it
    sizes = np.bincount(group, minlength=EXPERTS + 1)[:EXPERTS]
    blocks = row_blocks(jnp.asarray(group), jnp.asarray(sizes), EXPERTS, smallest=16)
    out = matmul(blocks.pad(jnp.asarray(x, dtype)), weights, jnp.asarray(bias, dtype), blocks.expert, blocks.size)
    out = np.asarray(blocks.unpad(out), np.float32)

    held = group < EXPERTS
    expected = np.einsum("ri,rio->ro", x[held], dense[group[held]]) + bias[group[held]]
    scale = np.abs(expected).max()
    np.testing.assert_allclose(out[held] / scale, expected / scale, atol=TOLERANCE[dtype])
    assert not np.any(out[~held]), "rows held elsewhere must read back as zero"
