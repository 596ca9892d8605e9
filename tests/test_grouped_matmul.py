"""The GPU expert kernel (`gptoss_dist.grouped_matmul`), run by Pallas' interpreter on the CPU."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_config
from expert_kernels import EXPERTS, check_kernel_matches_reference, expert_weights
from flax import nnx

from gptoss_dist import model as model_module
from gptoss_dist import mxfp4
from gptoss_dist.grouped_matmul import Tiles, default_tiles, grouped_matmul
from gptoss_dist.model import row_blocks

FAN_IN, FAN_OUT = 96, 128


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_fp4_codes_built_bit_by_bit_equal_the_decoder(dtype):
    """Every code under every scale (0..255) gives `mxfp4.decode`'s value, bit for bit, signed zeros, values
    flushed below the normal range and infinities above it included."""
    codes = np.arange(16, dtype=np.uint8)
    blocks = np.broadcast_to(codes | (codes[::-1] << 4), (256, 1, 16))  # every code in each nibble
    scales = np.arange(256, dtype=np.uint8)[:, None]
    expected = np.asarray(mxfp4.decode(jnp.asarray(blocks), jnp.asarray(scales), dtype))
    scale_of_code = jnp.broadcast_to(jnp.asarray(scales, jnp.int32), (256, 16))
    for nibble, column in ((codes, slice(0, None, 2)), (codes[::-1], slice(1, None, 2))):
        nibbles = jnp.broadcast_to(jnp.asarray(nibble, jnp.int32), (256, 16))
        built = np.asarray(mxfp4.fp4_to_float(nibbles, scale_of_code, dtype))
        bits = np.uint16 if dtype == jnp.bfloat16 else np.uint32
        np.testing.assert_array_equal(built.view(bits), expected[:, column].view(bits))


# A 3-way split of the contraction: dense, 6 steps of 16 inputs; packed, 3 steps of one scale group.
SPLIT_K = {False: Tiles(out=64, inner=16, split=3), True: Tiles(out=64, inner=1, split=3)}


@pytest.mark.parametrize("rows", [3, 40])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("split", [False, True], ids=["whole", "split-k"])
def test_each_row_meets_its_experts_matrix(rows, packed, dtype, split):
    """Rows routed at random (some held elsewhere), whole or with the contraction split, each give its expert's
    matrix times the row plus the bias."""
    group = np.sort(np.random.default_rng(rows).integers(0, EXPERTS + 1, rows))
    kernel = functools.partial(grouped_matmul, tiles=SPLIT_K[packed] if split else None, interpret=True)
    check_kernel_matches_reference(kernel, group, packed=packed, dtype=dtype, fan_in=FAN_IN, fan_out=FAN_OUT)


def test_tiles_split_the_contraction_evenly_at_few_blocks():
    """At one token (4 blocks) the 20B's 45 steps of 64 inputs are split among programs; at many blocks they
    are not; a split that does not divide the contraction is refused."""
    one_token = default_tiles(4, 16, 2880, 5760, packed=False)
    assert one_token.split > 1 and 45 % one_token.split == 0
    assert 4 * (5760 // one_token.out) * one_token.split <= 2048
    assert default_tiles(4, 16, 2880, 5760, packed=True).split > 1
    assert default_tiles(64, 64, 2880, 5760, packed=False).split == 1
    with pytest.raises(ValueError, match="does not divide"):
        grouped_matmul(jnp.zeros((16, FAN_IN)), jnp.zeros((EXPERTS, FAN_IN, FAN_OUT)), jnp.zeros((EXPERTS, FAN_OUT)),
                       jnp.zeros(1, jnp.int32), 16, tiles=Tiles(out=64, inner=16, split=4), interpret=True)  # fmt: skip


def test_unused_blocks_are_skipped():
    """With every row held elsewhere, no block runs: the kernel reads no expert at all."""
    rng = np.random.default_rng(0)
    group = np.full(8, EXPERTS)
    blocks = row_blocks(jnp.asarray(group), jnp.zeros(EXPERTS, jnp.int32), EXPERTS, smallest=16)
    assert np.all(np.asarray(blocks.expert) == EXPERTS)
    weights, _, _ = expert_weights(rng, False, FAN_IN, FAN_OUT)
    out = grouped_matmul(
        blocks.pad(jnp.ones((8, FAN_IN))), weights, jnp.zeros((EXPERTS, FAN_OUT)), blocks.expert, blocks.size,
        interpret=True,
    )
    assert not np.any(np.asarray(blocks.unpad(out)))


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_model_logits_through_the_kernel_equal_the_block_loop(packed):
    """The whole model with the GPU expert path (here interpreted) gives the CPU path's logits."""
    cfg = small_config(num_layers=1, layer_types=("full_attention",))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 12)))
    logits = {}
    for implementation in ("blocked", "gpu_kernel"):
        model = model_module.random_model(
            cfg, dtype=jnp.float32, packed_experts=packed, seed=3, experts_implementation=implementation
        )
        logits[implementation] = np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens))
    blocked, through_kernel = logits["blocked"], logits["gpu_kernel"]
    np.testing.assert_allclose(through_kernel, blocked, atol=1e-4 * np.abs(blocked).max())
