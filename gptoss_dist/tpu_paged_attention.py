"""Decode attention on TPUs (Pallas/Mosaic) that reads each sequence's pages of the pool up to its own length,
with GPT-OSS's sink logit.

One query token per sequence attends to the keys of its pages `pages[b]` at positions below `lengths[b]` (within
the last `window` of them on a sliding layer). The grid runs over sequences and KV heads; each copies its head's
live pieces of pages from HBM itself (the page table and lengths come by scalar prefetch), one piece in flight
while the last is read, in a loop of exactly as many steps as it has pieces: a sequence reads its own live keys
and no others, whatever the longest sequence of the batch or `max_len`. The portable path (`attention.attend`)
reads every row up to the batch's longest sequence.

Scalar prefetch puts a call's whole page table in SMEM (1 MiB on every TPU generation), so a large batch goes
to the kernel in several calls of at most `rows_per_call` rows.

The running softmax starts from the sink (maximum = sink, total = 1) as in `attention`, so a sequence that
sees no key returns zeros. The pool is [P, kv_heads, page, 2 * D] (`model.LayerCache`: keys and values side by
side, `attention.pair`), so a head's piece of a page is contiguous: whole (16, 128) tiles where the piece is a
multiple of 16 positions (`model.paged_decode_kernel` asks that of `auto`).

Why not JAX's `paged_attention` or `ragged_paged_attention`: neither takes a sink logit nor returns the
log-sum-exp from which one could be added afterwards, and their tuned blocks are for head_dim 128.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from gptoss_dist.attention import DEFAULT_BLOCK

F32 = jnp.float32
KERNEL_NAME = "paged_decode_attention"  # the Mosaic kernel's name in the compiled program
# The SMEM a call's scalar prefetch (page table and lengths) may take: half of the 1 MiB that Mosaic has on
# v5e, v6e, v5p and tpu7x alike, leaving the rest to the kernel's own scalars.
TABLE_BYTES = 512 * 1024
SMEM_ROW = 128  # SMEM holds a 2-D int32 array in rows of a multiple of 128 entries: [rows, 1] takes [rows, 128]


def paged_decode_attention(
    q: jax.Array,
    pool: jax.Array,
    pages: jax.Array,
    lengths: jax.Array,
    sinks: jax.Array,
    window: int | None = None,
    *,
    block: int = DEFAULT_BLOCK,
    table_bytes: int = TABLE_BYTES,
    interpret: bool = False,
) -> jax.Array:
    """Attention of q [B, Hq, D] (each at position lengths[b] - 1) to the keys at positions [0, lengths[b])
    of row b's pages pages[b] [B, W] of pool [P, kv_heads, page, 2 * D], within the last `window` positions
    when one is set; sinks [Hq]. Keys are read in pieces of `block_size(page, block)` positions. The rows go
    to the kernel in as few calls as keep each call's page table and lengths within `table_bytes` of SMEM.
    Returns [B, Hq, D] in q's dtype."""
    batch, num_heads, head_dim = q.shape
    num_pages, num_kv, page, paired = pool.shape
    if paired != 2 * head_dim or num_heads % num_kv:
        raise ValueError(f"q {q.shape} does not match the pool {pool.shape} (need [P, kv, page, 2 * head_dim])")
    rows = rows_per_call(pages.shape[1], table_bytes)
    call = functools.partial(_call, pool=pool, sinks=sinks.astype(F32).reshape(num_kv, -1, 1),
                             window=window, piece=block_size(page, block), interpret=interpret)  # fmt: skip
    q = q.reshape(batch, num_kv, num_heads // num_kv, head_dim)
    lengths, pages = lengths.astype(jnp.int32), jnp.clip(pages.astype(jnp.int32), 0, num_pages - 1)
    out = [call(q[at : at + rows], pages[at : at + rows], lengths[at : at + rows]) for at in range(0, batch, rows)]
    return jnp.concatenate(out).reshape(batch, num_heads, head_dim)


def rows_per_call(width: int, table_bytes: int = TABLE_BYTES) -> int:
    """The most rows of a page table `width` pages wide whose table and lengths (int32) fit in `table_bytes`:
    SMEM pads a row of the table to a multiple of 128 entries."""
    rows = table_bytes // (4 * (-(-width // SMEM_ROW) * SMEM_ROW + 1))
    if rows < 1:
        raise ValueError(f"a page table row of {width} pages does not fit in {table_bytes} bytes of SMEM")
    return rows


def _call(
    q: jax.Array, pages: jax.Array, lengths: jax.Array, *, pool: jax.Array, sinks: jax.Array, window: int | None,
    piece: int, interpret: bool,
) -> jax.Array:  # fmt: skip
    """One kernel call over the rows of q [B, kv_heads, group, D] and their pages and lengths."""
    batch, num_kv, group, head_dim = q.shape
    _, _, page, paired = pool.shape
    kernel = functools.partial(_kernel, page=page, piece=piece, window=window, scale=head_dim**-0.5)
    per_head = (None, None, group, head_dim)
    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(batch, num_kv),
        in_specs=[
            pl.BlockSpec(per_head, lambda b, head, *_: (b, head, 0, 0)),
            pl.BlockSpec(memory_space=pl.ANY),  # the pool stays in HBM: the kernel copies the pieces it reads
            pl.BlockSpec((None, group, 1), lambda b, head, *_: (head, 0, 0)),
        ],
        out_specs=pl.BlockSpec(per_head, lambda b, head, *_: (b, head, 0, 0)),
        scratch_shapes=[
            pltpu.VMEM((2, piece, paired), pool.dtype),  # two pieces: one read while the next comes in
            pltpu.SemaphoreType.DMA((2,)),
        ],
    )
    return pl.pallas_call(
        kernel,
        grid_spec=spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret,
        name=KERNEL_NAME,
    )(lengths, pages, q, pool, sinks)


def block_size(page: int, block: int) -> int:
    """The positions the kernel reads at a time: `block`, or a divisor of the page near it."""
    return page if page <= block else math.gcd(page, block)


def _live_pieces(length: jax.Array, piece: int, window: int | None) -> tuple[jax.Array, jax.Array]:
    """The first piece (of `piece` positions, counted along the row's pages) holding a key the row sees, and
    how many do from there. The division truncates (`lax.div`): on these non-negative values that is floor
    division, without the sign test `//` lowers to, which Mosaic cannot lower without a TPU to ask its
    generation."""
    start = jnp.int32(0) if window is None else jnp.maximum(length - window, 0)
    first = jax.lax.div(start, piece)
    end = jax.lax.div(length + piece - 1, piece)
    return first, jnp.maximum(end - first, 0)


def _kernel(lengths_ref, pages_ref, q_ref, pool_ref, sink_ref, out_ref, buffers, copied, *, page, piece, window, scale):
    b, head = pl.program_id(0), pl.program_id(1)
    length = lengths_ref[b]
    first, count = _live_pieces(length, piece, window)
    group, head_dim = q_ref.shape
    per_page = page // piece

    def copy(index, slot):
        """The copy of the head's piece `first + index` of the row's pages into buffer `slot`."""
        at = first + index
        offset = pl.multiple_of(jax.lax.rem(at, per_page) * piece, piece)
        source = pool_ref.at[pages_ref[b, jax.lax.div(at, per_page)], head, pl.ds(offset, piece)]
        return pltpu.make_async_copy(source, buffers.at[slot], copied.at[slot])

    @pl.when(count > 0)
    def _first():
        copy(0, 0).start()

    def fold(index, state):
        largest, total, weighted = state
        slot = jax.lax.rem(index, 2)
        copy(index, slot).wait()

        @pl.when(index + 1 < count)
        def _next():
            copy(index + 1, 1 - slot).start()

        kv = buffers[slot]  # [piece, 2 * D]
        k, v = kv[:, :head_dim], kv[:, head_dim:]
        positions = (first + index) * piece + jax.lax.broadcasted_iota(jnp.int32, (1, piece), 1)
        seen = positions < length
        if window is not None:
            seen &= positions >= length - window
        scores = jax.lax.dot_general(q_ref[...], k, (((1,), (1,)), ((), ())), preferred_element_type=F32)
        scores = jnp.where(seen, scores * scale, -jnp.inf)  # [group, piece]
        now = jnp.maximum(largest, scores.max(axis=-1, keepdims=True))
        weights = jnp.exp(scores - now)
        rescale = jnp.exp(largest - now)
        total = total * rescale + weights.sum(axis=-1, keepdims=True)
        weighted = weighted * rescale + jnp.dot(weights.astype(v.dtype), v, preferred_element_type=F32)
        return now, total, weighted

    start = (sink_ref[...], jnp.ones((group, 1), F32), jnp.zeros((group, head_dim), F32))
    _, total, weighted = jax.lax.fori_loop(0, count, fold, start)
    out_ref[...] = (weighted / total).astype(out_ref.dtype)
