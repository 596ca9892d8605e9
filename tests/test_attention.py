"""Blockwise attention against a dense reference that builds the whole score matrix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_dist.attention import KeySpan, attend, pair


def dense_attention(q, k, v, sinks, q_pos, k_pos, k_real, window):
    """GPT-OSS attention as openai/gpt-oss writes it: softmax over [scores / sqrt(D), sink], sink dropped."""
    batch, length, heads, dim = q.shape
    kv = k.shape[2]
    q = q.reshape(batch, length, kv, heads // kv, dim)
    scores = np.einsum("btkgd,bskd->bkgts", q, k) * dim**-0.5
    distance = q_pos[:, :, None] - k_pos[:, None, :]
    seen = k_real[:, None, :] & (distance >= 0)
    if window is not None:
        seen &= distance < window
    scores = np.where(seen[:, None, None], scores, -np.inf)
    sink = np.broadcast_to(sinks.reshape(1, kv, -1, 1, 1), (*scores.shape[:-1], 1))
    logits = np.concatenate([scores, sink], axis=-1)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs = (probs / probs.sum(axis=-1, keepdims=True))[..., :-1]
    return np.einsum("bkgts,bskd->btkgd", probs, v).reshape(batch, length, heads, dim)


def random_qkv(rng, batch, q_len, k_len, heads=4, kv=2, dim=8):
    q = rng.normal(size=(batch, q_len, heads, dim)).astype(np.float32)
    k = rng.normal(size=(batch, k_len, kv, dim)).astype(np.float32)
    v = rng.normal(size=(batch, k_len, kv, dim)).astype(np.float32)
    return q, k, v, rng.normal(size=heads).astype(np.float32)


def blockwise(q, q_first, sinks, spans, window, block):
    jitted = jax.jit(attend, static_argnames=("window", "block"))
    return np.asarray(jitted(jnp.asarray(q), jnp.asarray(q_first), jnp.asarray(sinks), spans, window, block=block))


@pytest.mark.parametrize("window", [None, 8])
@pytest.mark.parametrize("block", [4, 5, 64])
def test_prefill_equals_dense(window, block):
    """Self-attention over padded rows (left, right, none, empty), blocks that divide the length or not."""
    rng = np.random.default_rng(0)
    q, k, v, sinks = random_qkv(rng, 4, 23, 23)
    start, end = np.array([0, 5, 0, 0]), np.array([23, 23, 11, 0])
    first = -start
    got = blockwise(q, first, sinks, [KeySpan(pair(jnp.asarray(k), jnp.asarray(v)), end=jnp.asarray(end),
                                              first=jnp.asarray(first), start=jnp.asarray(start))], window, block)
    positions = first[:, None] + np.arange(23)
    real = (np.arange(23) >= start[:, None]) & (np.arange(23) < end[:, None])
    expected = dense_attention(q, k, v, sinks, positions, positions, real, window)
    for row in range(4):
        rows = slice(start[row], end[row])
        np.testing.assert_allclose(got[row, rows], expected[row, rows], rtol=1e-5, atol=1e-6)


def test_a_query_that_sees_no_key_returns_zeros():
    rng = np.random.default_rng(1)
    q, k, v, sinks = random_qkv(rng, 1, 3, 6)
    span = KeySpan(pair(jnp.asarray(k), jnp.asarray(v)), end=jnp.asarray([6]), first=jnp.asarray([10]))
    got = blockwise(q, np.array([0]), sinks, [span], None, 4)  # every key is in the queries' future
    assert np.all(got == 0)
    assert np.all(dense_attention(q, k, v, sinks, np.arange(3)[None], 10 + np.arange(6)[None],
                                  np.ones((1, 6), bool), None) == 0)  # fmt: skip


def as_pool(k: np.ndarray, v: np.ndarray) -> jnp.ndarray:
    """Keys and values [pages, page, heads, D] as a pool of pages [pages, heads, page, 2 * D]."""
    return jnp.swapaxes(pair(jnp.asarray(k), jnp.asarray(v)), 1, 2)


@pytest.mark.parametrize("window", [None, 8])
def test_a_chunk_against_a_cache_equals_dense(window):
    """Queries at positions 13..21 of their sequences, whose earlier keys sit in a cache (a contiguous one
    read through its slot, pages of a pool read through a page table, and a ring of the window), plus their
    own keys, in blocks of part of a page, a page and several pages (12: a size that divides neither the
    contiguous cache nor its page)."""
    rng = np.random.default_rng(2)
    slots, chunk, start = 3, 9, 13
    q, new_k, new_v, sinks = random_qkv(rng, 2, chunk, chunk)
    history_k, history_v = (rng.normal(size=(2, start, 2, 8)).astype(np.float32) for _ in range(2))
    rows = np.array([2, 0])
    cache_k, cache_v = np.zeros((slots, 32, 2, 8), np.float32), np.zeros((slots, 32, 2, 8), np.float32)
    cache_k[rows, :start], cache_v[rows, :start] = history_k, history_v
    ring_k, ring_v = np.zeros((slots, 8, 2, 8), np.float32), np.zeros((slots, 8, 2, 8), np.float32)
    for p in range(start - 8, start):
        ring_k[rows, p % 8], ring_v[rows, p % 8] = history_k[:, p], history_v[:, p]
    first = np.full(2, start)
    new = KeySpan(pair(jnp.asarray(new_k), jnp.asarray(new_v)), end=jnp.full(2, chunk), first=jnp.asarray(first))
    whole = np.concatenate([history_k, new_k], 1), np.concatenate([history_v, new_v], 1)
    positions = np.broadcast_to(np.arange(start + chunk), (2, start + chunk))
    expected = dense_attention(q, *whole, sinks, first[:, None] + np.arange(chunk), positions,
                               np.ones_like(positions, bool), window)  # fmt: skip
    page_table = np.array([[5, 1, 7, 2], [0, 6, 3, 4]])  # pages of 4 positions, in no order, from a pool of 8
    pool_k, pool_v = np.full((8, 4, 2, 8), 7.0, np.float32), np.full((8, 4, 2, 8), 7.0, np.float32)
    for row, p in np.ndindex(2, start):
        page = page_table[row, p // 4]
        pool_k[page, p % 4], pool_v[page, p % 4] = history_k[row, p], history_v[row, p]
    held = jnp.full(2, start)
    contiguous = KeySpan(as_pool(cache_k, cache_v), end=held, pages=jnp.asarray(rows)[:, None])
    paged = KeySpan(as_pool(pool_k, pool_v), end=held, pages=jnp.asarray(page_table))
    ring = KeySpan(as_pool(ring_k, ring_v), end=held, pages=jnp.asarray(rows)[:, None], ring=True)
    for cached in (contiguous, paged, ring) if window else (contiguous, paged):
        for block in (2, 4, 12, 16):
            got = blockwise(q, first, sinks, [cached, new], window, block)
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window", [None, 8])
def test_decode_equals_dense(window):
    """One query per slot, each at its own length, against a cache of up to 40 positions."""
    rng = np.random.default_rng(3)
    lengths = np.array([1, 7, 8, 9, 40])
    q, k, v, sinks = random_qkv(rng, 5, 1, 41)
    span = KeySpan(pair(jnp.asarray(k), jnp.asarray(v)), end=jnp.asarray(lengths + 1))
    got = blockwise(q, lengths, sinks, [span], window, 4)
    real = np.arange(41) <= lengths[:, None]
    expected = dense_attention(q, k, v, sinks, lengths[:, None], np.broadcast_to(np.arange(41), (5, 41)), real, window)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_sliding_window_sees_exactly_its_keys():
    """With equal scores and no sink, each query averages exactly the keys q-7..q of a window of 8."""
    length = 20
    q = np.zeros((1, length, 1, 4), np.float32)
    v = np.zeros((1, length, 1, length), np.float32)
    v[0, :, 0] = np.eye(length)
    k = np.zeros((1, length, 1, length), np.float32)
    span = KeySpan(pair(jnp.asarray(k), jnp.asarray(v)), end=jnp.asarray([length]))
    out = blockwise(np.pad(q, ((0, 0), (0, 0), (0, 0), (0, length - 4))), np.array([0]), np.array([-1e30]),
                    [span], 8, 3)[0, :, 0]  # fmt: skip
    for t in range(length):
        seen = list(range(max(0, t - 7), t + 1))
        np.testing.assert_allclose(out[t, seen], 1 / len(seen), rtol=1e-6)
        assert np.all(np.delete(out[t], seen) == 0)


def test_a_one_page_table_is_read_in_blocks_of_the_block_size():
    """A slot's whole context as one page of a length the block does not divide (max_len 1000) is read in
    blocks of 512, not of their greatest common divisor (8); pages of a longer table in whole pages."""

    def span(page: int, width: int) -> KeySpan:
        pool = jnp.zeros((8, 1, page, 4))
        return KeySpan(pair(pool, pool), end=jnp.ones(2, jnp.int32), pages=jnp.zeros((2, width), jnp.int32))

    assert span(1000, 1).block_size(512) == 512
    assert span(128, 4).block_size(512) == 512 and span(128, 4).block_size(96) == 32


def test_blocks_outside_the_window_and_the_future_are_skipped():
    """A span whose keys outside what the queries may see are NaN: skipped blocks are never read."""
    rng = np.random.default_rng(4)
    q, k, v, sinks = random_qkv(rng, 1, 4, 64)
    k[:, :40], v[:, :40] = np.nan, np.nan  # before the window of queries 48..51
    k[:, 52:], v[:, 52:] = np.nan, np.nan  # their future
    span = KeySpan(pair(jnp.asarray(k), jnp.asarray(v)), end=jnp.asarray([64]))
    got = blockwise(q, np.array([48]), sinks, [span], 8, 4)
    positions = np.arange(64)[None]
    k[:, :40], v[:, :40], k[:, 52:], v[:, 52:] = 0, 0, 0, 0
    expected = dense_attention(q, k, v, sinks, 48 + np.arange(4)[None], positions, np.ones((1, 64), bool), 8)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
