"""Blockwise attention with GPT-OSS's learned sink logit: an online softmax over blocks of keys (flash-style),
so that no call builds a whole [queries, keys] score matrix and memory grows with the block, not the context.

Keys come in `KeySpan`s: runs of consecutive positions, such as a slot's cache or the keys of the tokens being
run. Because their positions are consecutive, the blocks a block of queries can see follow from the positions
alone, and the rest are skipped: future blocks, and on sliding layers everything before the window.

The sink joins each row's softmax as one more (unscaled) logit that carries a zero value vector. The running
softmax starts from it (maximum = sink, total = 1), so a row that sees no key attends to nothing and returns
zeros. This portable path runs on every backend; it is the reference for any backend kernel put behind `attend`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

F32 = jnp.float32
DEFAULT_BLOCK = 512


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KeySpan:
    """Keys and values of which query row b sees a span: at index s of the span is the key of position
    `first[b] + s`, real for `start[b] <= s < end[b]`; or, for a `ring`, the key of the one position p < end[b]
    with p % length == s among the last `length`, real if p >= 0.

    Keys and values are side by side in kv (`pair`). Without `pages`, kv is [B, length, kv_heads,
    2 * head_dim] and row b's span is row b. With `pages` [B, W], kv is a pool [P, kv_heads, page, 2 * head_dim]
    of pages (`model.LayerCache`) and row b's span is its pages `pages[b]` one after the other (length
    W * page): a page table (a ring is one page)."""

    kv: jax.Array
    end: jax.Array  # [B] int32
    first: jax.Array | int = 0  # [B] int32
    start: jax.Array | int = 0  # [B] int32
    pages: jax.Array | None = None  # [B, W] int32
    ring: bool = dataclasses.field(default=False, metadata={"static": True})

    @property
    def page(self) -> int:
        """Positions in a page of the pool, or in the whole span without a page table."""
        return self.kv.shape[1] if self.pages is None else self.kv.shape[2]

    @property
    def kv_heads(self) -> int:
        return self.kv.shape[2] if self.pages is None else self.kv.shape[1]

    @property
    def length(self) -> int:
        return self.page * (1 if self.pages is None else self.pages.shape[1])

    def block_size(self, block: int) -> int:
        """The size of the blocks the span is read in, about `block`: at most its length, and through a page
        table whole pages or a part of a page that divides it, so that no block straddles two pages (a table
        of one page, as a slot's whole context or ring, has no second page to straddle)."""
        page = self.page
        if self.pages is None or self.pages.shape[1] == 1:
            return min(block, self.length)
        if block >= page:
            return page * min(block // page, self.pages.shape[1])
        return math.gcd(page, block)

    def block(self, index: jax.Array, size: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """Keys and values [B, size, kv, D] of the block that starts at `index` (a multiple of `size`, from
        `block_size`), their positions [B, size] and which are real. The last block of a span whose length
        `size` does not divide is shifted back to fit; the keys it repeats are not real, so that no key counts
        twice."""
        length = self.length
        offset = jnp.minimum(index, length - size)
        if self.pages is None:
            kv = jax.lax.dynamic_slice_in_dim(self.kv, offset, size, axis=1)
        else:
            kv = self._paged_block(offset, size)
        k, v = unpair(kv)
        at = offset + jnp.arange(size)
        if self.ring:
            last = self.end[:, None] - 1
            positions = last - (last - at) % length
            return k, v, positions, (at >= index) & (positions >= 0)
        real = (at >= index) & (at >= _column(self.start)) & (at < self.end[:, None])
        return k, v, jnp.broadcast_to(_column(self.first) + at, real.shape), real

    def _paged_block(self, offset: jax.Array, size: int) -> jax.Array:
        """The block of `size` keys and values [B, size, kv_heads, 2 * D] from `offset` read through the page
        table: for each head, whole runs of `unit` positions (the largest that every block's offset and every
        page boundary fall on) of the pool viewed as [pages, heads, runs a page, unit, 2 * D]. The TPU compiler
        gathers such runs from the pool as it is stored; a gather of slices within a page, or of runs holding
        every head, made it copy a layer's whole pool into another layout for each decode step (see
        BENCHMARKS.md, "The page pool read and written where it is stored")."""
        heads, page = self.kv.shape[1:3]
        unit = math.gcd(size, page)
        starts = offset + jnp.arange(size // unit) * unit  # [n] indices into the span
        pages = jnp.take(self.pages, starts // page, axis=1)  # [B, n]
        runs = self.kv.reshape(self.kv.shape[0], heads, page // unit, unit, self.kv.shape[-1])
        block = runs[pages, :, (starts % page // unit)[None, :]]  # [B, n, kv_heads, unit, 2 * D]
        return jnp.moveaxis(block, 2, 3).reshape(pages.shape[0], size, heads, -1)


def pair(k: jax.Array, v: jax.Array) -> jax.Array:
    """Keys and values [..., head_dim] side by side in one array [..., 2 * head_dim]. A cache row of GPT-OSS's
    64-wide heads is then 128 wide, a TPU's lane width: the TPU compiler neither pads it nor, to avoid padding,
    stores it sequence-minor and re-lays it for every decode call (see BENCHMARKS.md)."""
    return jnp.concatenate([k, v], axis=-1)


def unpair(kv: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The keys and values of `pair`."""
    return jnp.split(kv, 2, axis=-1)


def _column(x: jax.Array | int) -> jax.Array | int:
    return x[:, None] if jnp.ndim(x) else x


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Softmax:
    """The running softmax of a block of queries: per (row, kv head, group, query) the largest logit so far,
    the sum of exp(logit - largest), and the values weighted likewise."""

    largest: jax.Array  # [B, kv, g, Tq] float32
    total: jax.Array  # [B, kv, g, Tq] float32
    weighted: jax.Array  # [B, kv, g, Tq, D] float32


def attend(
    q: jax.Array,
    q_first: jax.Array,
    sinks: jax.Array,
    spans: Sequence[KeySpan],
    window: int | None,
    *,
    block: int = DEFAULT_BLOCK,
) -> jax.Array:
    """Grouped attention with a learned sink logit per head, computed block by block.

    q [B, T, Hq, D] holds queries at positions `q_first[b] + t`; each attends, causally and within `window`
    keys when one is set, to the real keys of `spans`; sinks [Hq]. Returns [B, T, Hq, D] in q's dtype.
    """
    batch, length, num_heads, head_dim = q.shape
    num_kv = spans[0].kv_heads
    q_block = min(block, length)
    num_q_blocks = math.ceil(length / q_block)
    padded = jnp.pad(q, ((0, 0), (0, num_q_blocks * q_block - length), (0, 0), (0, 0)))
    grouped = padded.reshape(batch, num_q_blocks, q_block, num_kv, num_heads // num_kv, head_dim)
    sink = sinks.astype(F32).reshape(num_kv, -1)

    def query_block(index_and_q):
        index, q_blk = index_and_q
        q_pos = q_first[:, None] + index * q_block + jnp.arange(q_block)
        state = _Softmax(
            largest=jnp.broadcast_to(sink[None, :, :, None], (batch, *sink.shape, q_block)),
            total=jnp.ones((batch, *sink.shape, q_block), F32),
            weighted=jnp.zeros((batch, *sink.shape, q_block, head_dim), F32),
        )
        for span in spans:
            state = _attend_span(state, q_blk, q_pos, span, window, block)
        out = state.weighted / state.total[..., None]
        return jnp.einsum("bkgtd->btkgd", out).astype(q.dtype)

    if num_q_blocks == 1:  # as decoding and short pieces are: no loop to compile and run
        out = query_block((0, grouped[:, 0]))[:, None]
    else:
        out = jnp.moveaxis(jax.lax.map(query_block, (jnp.arange(num_q_blocks), jnp.moveaxis(grouped, 1, 0))), 0, 1)
    return out.reshape(batch, num_q_blocks * q_block, num_heads, head_dim)[:, :length]


def _attend_span(
    state: _Softmax, q: jax.Array, q_pos: jax.Array, span: KeySpan, window: int | None, block: int
) -> _Softmax:
    """Folds into `state` the blocks of `span` that the queries q [B, Tq, kv, g, D] at q_pos [B, Tq] can see."""
    size = span.block_size(block)
    scale = q.shape[-1] ** -0.5

    def fold(index, state: _Softmax) -> _Softmax:
        k, v, k_pos, real = span.block(index * size, size)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=F32) * scale
        distance = q_pos[:, :, None] - k_pos[:, None, :]
        seen = real[:, None, :] & (distance >= 0)
        if window is not None:
            seen &= distance < window
        scores = jnp.where(seen[:, None, None], scores, -jnp.inf)
        largest = jnp.maximum(state.largest, scores.max(axis=-1))
        weights = jnp.exp(scores - largest[..., None])
        rescale = jnp.exp(state.largest - largest)
        weighted = jnp.einsum("bkgts,bskd->bkgtd", weights.astype(v.dtype), v, preferred_element_type=F32)
        return _Softmax(
            largest=largest,
            total=state.total * rescale + weights.sum(axis=-1),
            weighted=state.weighted * rescale[..., None] + weighted,
        )

    if span.length == size:  # a span of one block (a window's ring, a short cache): no loop, masks suffice
        return fold(0, state)
    return jax.lax.fori_loop(*_visible_blocks(q_pos, span, window, size), fold, state)


def _visible_blocks(q_pos: jax.Array, span: KeySpan, window: int | None, size: int) -> tuple[jax.Array, jax.Array]:
    """The range of blocks of `size` keys of `span` that hold a key some query at q_pos [B, Tq] may see (all of a
    ring's: it is as long as a window)."""
    if span.ring:
        return 0, -(-span.length // size)
    lowest_q, highest_q = q_pos[:, 0] - span.first, q_pos[:, -1] - span.first  # as indices into the span
    start = span.start if window is None else jnp.maximum(span.start, lowest_q - window + 1)
    end = jnp.minimum(span.end, highest_q + 1)
    seen = start < end
    start = jnp.min(jnp.where(seen, start, span.length))
    end = jnp.max(jnp.where(seen, end, 0))
    return start // size, jnp.maximum(start // size, -(-end // size))
