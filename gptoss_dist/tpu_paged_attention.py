"""Decode attention on TPUs (Pallas/Mosaic) that reads each sequence's pages of the pool up to its own length,
with GPT-OSS's sink logit.

One query token per sequence attends to the keys of its pages `pages[b]` at positions below `lengths[b]` (within
the last `window` of them on a sliding layer). The grid runs over sequences; each copies its live pieces of
pages from HBM itself (the page table and lengths come by scalar prefetch), one piece in flight while the
last is read, and runs a loop of exactly as many steps as it has pieces: a sequence reads its own live keys
and no others, whatever the longest sequence of the batch or `max_len`. The portable path (`attention.attend`)
reads every row up to the batch's longest sequence.

The running softmax starts from the sink (maximum = sink, total = 1) as in `attention`, so a sequence that
sees no key returns zeros. The pool [P, page, kv_heads, 2 * D] (keys and values side by side, `attention.pair`)
is read as [P, page * kv_heads, 2 * D]: the same bytes in the same (8, 128) tiles, so XLA passes it as it is,
whether a device holds one KV head or several. A piece holds every local KV head's rows; each query head is
scored against all of them and the other heads' rows masked.

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


def paged_decode_attention(
    q: jax.Array,
    pool: jax.Array,
    pages: jax.Array,
    lengths: jax.Array,
    sinks: jax.Array,
    window: int | None = None,
    *,
    block: int = DEFAULT_BLOCK,
    interpret: bool = False,
) -> jax.Array:
    """Attention of q [B, Hq, D] (each at position lengths[b] - 1) to the keys at positions [0, lengths[b])
    of row b's pages pages[b] [B, W] of pool [P, page, kv_heads, 2 * D], within the last `window` positions
    when one is set; sinks [Hq]. Keys are read in pieces of `block_size(page, block)` positions. Returns
    [B, Hq, D] in q's dtype."""
    batch, num_heads, head_dim = q.shape
    num_pages, page, num_kv, paired = pool.shape
    if paired != 2 * head_dim or num_heads % num_kv:
        raise ValueError(f"q {q.shape} does not match the pool {pool.shape} (need [P, page, kv, 2 * head_dim])")
    group, piece = num_heads // num_kv, block_size(page, block)
    kernel = functools.partial(_kernel, page=page, piece=piece, group=group, window=window, scale=head_dim**-0.5)
    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(batch,),
        in_specs=[
            pl.BlockSpec((None, num_heads, head_dim), lambda b, *_: (b, 0, 0)),
            pl.BlockSpec(memory_space=pl.ANY),  # the pool stays in HBM: the kernel copies the pieces it reads
            pl.BlockSpec((num_heads, 1), lambda b, *_: (0, 0)),
        ],
        out_specs=pl.BlockSpec((None, num_heads, head_dim), lambda b, *_: (b, 0, 0)),
        scratch_shapes=[
            pltpu.VMEM((2, piece * num_kv, paired), pool.dtype),  # two pieces: one read while the next comes in
            pltpu.SemaphoreType.DMA((2,)),
        ],
    )
    return pl.pallas_call(
        kernel,
        grid_spec=spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=interpret,
        name=KERNEL_NAME,
    )(
        lengths.astype(jnp.int32),
        jnp.clip(pages.astype(jnp.int32), 0, num_pages - 1),
        q,
        pool.reshape(num_pages, page * num_kv, paired),  # the same bytes, tiles and all (see above)
        sinks.astype(F32).reshape(num_heads, 1),
    )


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


def _kernel(lengths_ref, pages_ref, q_ref, pool_ref, sink_ref, out_ref, buffers, copied, *, page, piece, group, window, scale):
    b = pl.program_id(0)
    length = lengths_ref[b]
    first, count = _live_pieces(length, piece, window)
    num_heads, head_dim = q_ref.shape
    num_kv = num_heads // group
    per_page, rows = page // piece, piece * num_kv

    def copy(index, slot):
        """The copy of the row's piece `first + index` (every KV head's keys and values) into buffer `slot`."""
        at = first + index
        offset = pl.multiple_of(jax.lax.rem(at, per_page) * rows, rows)
        source = pool_ref.at[pages_ref[b, jax.lax.div(at, per_page)], pl.ds(offset, rows)]
        return pltpu.make_async_copy(source, buffers.at[slot], copied.at[slot])

    # Row r of a piece is position r // num_kv's key of KV head r % num_kv; query head h reads KV head h // group.
    # Scoring every query head against every row and masking the other heads' rows costs num_kv times the
    # arithmetic of a per-head loop, but no sublane shuffles (which Mosaic lacks for 16-bit strided loads).
    row = jax.lax.broadcasted_iota(jnp.int32, (1, rows), 1)
    own_head = jax.lax.rem(row, num_kv) == jax.lax.div(jax.lax.broadcasted_iota(jnp.int32, (num_heads, 1), 0), group)

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

        kv = buffers[slot]  # [piece * num_kv, 2 * D]
        k, v = kv[:, :head_dim], kv[:, head_dim:]
        positions = (first + index) * piece + jax.lax.div(row, num_kv)
        seen = own_head & (positions < length)
        if window is not None:
            seen &= positions >= length - window
        scores = jax.lax.dot_general(q_ref[...], k, (((1,), (1,)), ((), ())), preferred_element_type=F32)
        scores = jnp.where(seen, scores * scale, -jnp.inf)  # [num_heads, rows]
        now = jnp.maximum(largest, scores.max(axis=-1, keepdims=True))
        weights = jnp.exp(scores - now)
        rescale = jnp.exp(largest - now)
        total = total * rescale + weights.sum(axis=-1, keepdims=True)
        weighted = weighted * rescale + jnp.dot(weights.astype(v.dtype), v, preferred_element_type=F32)
        return now, total, weighted

    start = (sink_ref[...], jnp.ones((num_heads, 1), F32), jnp.zeros((num_heads, head_dim), F32))
    _, total, weighted = jax.lax.fori_loop(0, count, fold, start)
    out_ref[...] = (weighted / total).astype(out_ref.dtype)
