"""MXFP4 decoding against transformers' `convert_moe_packed_tensors`, and the encoder the tests rely on."""

import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_dist import mxfp4


def every_code_and_scale(experts: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Blocks holding every byte value (so every nibble in both halves) under every scale 0..255."""
    rng = np.random.default_rng(0)
    blocks = np.stack([rng.permutation(256).astype(np.uint8).reshape(16, 16) for _ in range(experts * 256)])
    blocks = blocks.reshape(experts, 256, 16, 16)
    scales = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None], (experts, 256, 16)).copy()
    return blocks, scales


def test_numpy_decoder_is_bit_exact_with_transformers():
    torch = pytest.importorskip("torch")
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = every_code_and_scale()
    expected = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
    # transformers returns (E, in, out); the stored layout (and ours) is (E, out, in).
    ours = mxfp4.decode_np(blocks, scales).transpose(0, 2, 1)
    assert ours.shape == tuple(expected.shape)
    np.testing.assert_array_equal(ours.view(np.uint32), expected.numpy().view(np.uint32))


def test_jax_decoder_equals_numpy_decoder_bit_for_bit_on_normal_floats():
    blocks, scales = every_code_and_scale(experts=1)
    host = mxfp4.decode_np(blocks, scales)
    device = np.asarray(mxfp4.decode(jnp.asarray(blocks), jnp.asarray(scales), jnp.float32))
    normal = scales >= 2  # XLA flushes the subnormal results of scales 0 and 1 to zero
    normal = np.repeat(normal, 32, axis=-1)
    np.testing.assert_array_equal(device[normal].view(np.uint32), host[normal].view(np.uint32))
    assert device.shape == host.shape


def test_first_value_is_the_low_nibble():
    blocks = np.zeros((1, 16), np.uint8)  # one group of 32 values
    blocks[0, 0] = 0x72  # low nibble 2 -> 1.0, high nibble 7 -> 6.0
    values = mxfp4.decode_np(blocks, np.array([127], np.uint8))
    assert values.shape == (32,) and values[:2].tolist() == [1.0, 6.0]
    assert mxfp4.decode_np(blocks, np.array([129], np.uint8))[:2].tolist() == [4.0, 24.0]


def test_encoder_round_trips_representable_values_and_rounds_to_nearest():
    rng = np.random.default_rng(1)
    values = rng.normal(size=(3, 5, 64)).astype(np.float32) * 10.0 ** rng.integers(-3, 3, (3, 5, 1))
    decoded = mxfp4.decode_np(*mxfp4.encode_np(values))
    np.testing.assert_array_equal(mxfp4.decode_np(*mxfp4.encode_np(decoded)), decoded)
    # Each group's scale maps its peak to at most 6, so the error is at most half the largest FP4 step (1.0).
    groups, peaks = values.reshape(3, 5, 2, 32), np.abs(values.reshape(3, 5, 2, 32)).max(-1, keepdims=True)
    step = 2.0 ** np.ceil(np.log2(peaks / 6.0))
    assert np.all(np.abs(decoded.reshape(groups.shape) - groups) <= step)


def test_mismatched_blocks_and_scales_are_refused():
    with pytest.raises(ValueError, match="do not match"):
        mxfp4.decode_np(np.zeros((2, 4, 16), np.uint8), np.zeros((2, 3), np.uint8))


def test_encoder_picks_the_nearest_code_with_ties_to_the_lower_magnitude_and_zero_positive():
    ties = [0.0, -0.0, 0.25, -0.25, 0.75, -0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, 6.0, -6.0, 1e-30, -1e-30]
    values = np.array([ties + [0.1 * i for i in range(16)]], np.float32)  # one group whose peak is 6
    blocks, scales = mxfp4.encode_np(values)
    assert scales.tolist() == [[127]]
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(-1)
    nearest = np.argmin(np.abs(values[0, :, None] - mxfp4.FP4_VALUES), axis=-1)  # first minimum: +0, lower value
    np.testing.assert_array_equal(codes, nearest)
