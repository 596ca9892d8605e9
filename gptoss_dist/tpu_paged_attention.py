"""Decode attention on TPUs (Pallas/Mosaic) that reads each sequence's pages of the pool up to its own length,
with GPT-OSS's sink logit.

One query token per sequence attends to the keys of its pages `pages[b]` at positions below `lengths[b]` (within
the last `window` of them on a sliding layer). The grid runs sequences outside and page steps inside; a step's
page comes in by scalar prefetch, through the index map. Steps past a sequence's last page (or before its
window) ask for the same page as the step before, so Pallas fetches nothing new and the step is skipped: a
sequence reads its own live pages and no others, whatever the longest sequence of the batch. The portable
path (`attention.attend`) reads every row up to the batch's longest sequence.

The running softmax starts from the sink (maximum = sink, total = 1) as in `attention`, so a sequence that
sees no key returns zeros. The grid's middle axis is the KV heads: a block is one head's
page [page, 2 * head_dim] (keys and values side by side, `attention.pair`), whole (8, 128) tiles. The pool
[P, page, kv_heads, 2 * D] is read as [P, kv_heads, page, 2 * D]: free where a device holds one KV head (the
KV heads split over `tensor`, as the 20B's rules place them), a copy of the pool otherwise.

Why not JAX's `paged_attention` or `ragged_paged_attention`: neither takes a sink logit nor returns the
log-sum-exp from which one could be added afterwards, and their tuned blocks are for head_dim 128.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

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
    interpret: bool = False,
) -> jax.Array:
    """Attention of q [B, Hq, D] (each at position lengths[b] - 1) to the keys at positions [0, lengths[b])
    of row b's pages pages[b] [B, W] of pool [P, page, kv_heads, 2 * D], within the last `window` positions
    when one is set; sinks [Hq]. Returns [B, Hq, D] in q's dtype."""
    batch, num_heads, head_dim = q.shape
    num_pages, page, num_kv, paired = pool.shape
    if paired != 2 * head_dim or num_heads % num_kv:
        raise ValueError(f"q {q.shape} does not match the pool {pool.shape} (need [P, page, kv, 2 * head_dim])")
    group = num_heads // num_kv
    width = pages.shape[1]

    def page_of(b, head, step, lengths_ref, pages_ref):
        """The pool page of row b's step: its live pages in order, then its last one again."""
        first, last = _live_pages(lengths_ref[b], page, window)
        index = jnp.minimum(first + step, last)
        return (jnp.clip(pages_ref[b, index], 0, num_pages - 1), head, 0, 0)

    kernel = functools.partial(_kernel, page=page, window=window, scale=head_dim**-0.5)
    per_head = (None, None, group, head_dim)
    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(batch, num_kv, width),
        in_specs=[
            pl.BlockSpec(per_head, lambda b, head, step, *_: (b, head, 0, 0)),
            pl.BlockSpec((None, None, page, paired), page_of),
            pl.BlockSpec((None, group, 1), lambda b, head, step, *_: (head, 0, 0)),
        ],
        out_specs=pl.BlockSpec(per_head, lambda b, head, step, *_: (b, head, 0, 0)),
        scratch_shapes=[
            pltpu.VMEM((group, 1), F32),  # the largest logit so far
            pltpu.VMEM((group, 1), F32),  # the sum of exp(logit - largest)
            pltpu.VMEM((group, head_dim), F32),  # the values weighted likewise
        ],
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=spec,
        out_shape=jax.ShapeDtypeStruct((batch, num_kv, group, head_dim), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name=KERNEL_NAME,
    )(
        lengths.astype(jnp.int32),
        pages.astype(jnp.int32),
        q.reshape(batch, num_kv, group, head_dim),
        jnp.swapaxes(pool, 1, 2),  # [P, kv, page, 2D]: a head's page is a block of whole tiles
        sinks.astype(F32).reshape(num_kv, group, 1),
    )
    return out.reshape(batch, num_heads, head_dim)


def _live_pages(length: jax.Array, page: int, window: int | None) -> tuple[jax.Array, jax.Array]:
    """The first and last index into a row's page table holding a key it sees (first > last: none). The
    division truncates (`lax.div`): on these non-negative values that is floor division, without the sign
    test `//` lowers to, which Mosaic cannot lower without a TPU to ask its generation."""
    start = jnp.int32(0) if window is None else jnp.maximum(length - window, 0)
    return jax.lax.div(start, page), jax.lax.div(jnp.maximum(length - 1, 0), page)


def _kernel(lengths_ref, pages_ref, q_ref, kv_ref, sink_ref, out_ref, largest, total, weighted, *, page, window, scale):
    b, step = pl.program_id(0), pl.program_id(2)
    length = lengths_ref[b]
    first, last = _live_pages(length, page, window)
    head_dim = q_ref.shape[-1]

    @pl.when(step == 0)
    def _start():
        largest[...] = sink_ref[...]
        total[...] = jnp.ones_like(total)
        weighted[...] = jnp.zeros_like(weighted)

    @pl.when((first + step <= last) & (length > 0))
    def _fold():
        positions = (first + step) * page + jax.lax.broadcasted_iota(jnp.int32, (1, page), 1)
        seen = positions < length
        if window is not None:
            seen &= positions >= length - window
        k, v = kv_ref[:, :head_dim], kv_ref[:, head_dim:]  # [page, D] each
        scores = jax.lax.dot_general(q_ref[...], k, (((1,), (1,)), ((), ())), preferred_element_type=F32)
        scores = jnp.where(seen, scores * scale, -jnp.inf)  # [group, page]
        now = jnp.maximum(largest[...], scores.max(axis=-1, keepdims=True))
        weights = jnp.exp(scores - now)
        rescale = jnp.exp(largest[...] - now)
        largest[...] = now
        total[...] = total[...] * rescale + weights.sum(axis=-1, keepdims=True)
        weighted[...] = weighted[...] * rescale + jnp.dot(weights.astype(v.dtype), v, preferred_element_type=F32)

    @pl.when(step == pl.num_programs(2) - 1)
    def _finish():
        out_ref[...] = (weighted[...] / total[...]).astype(out_ref.dtype)
