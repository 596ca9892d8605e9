"""GPT-OSS in Flax NNX.

Every weight is declared once, here, with the logical names of its axes (`Param(..., logical_axes=...)`);
`gptoss_dist.sharding` maps those names to mesh axes. Layouts are JAX's (inputs first): a Hugging Face
`Linear` weight (out, in) is stored transposed. Softmax, norms and the router run in float32 whatever the
compute dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_dist import grouped_matmul, mxfp4, tpu_grouped_matmul, tpu_paged_attention
from gptoss_dist.attention import DEFAULT_BLOCK, KeySpan, attend, pair
from gptoss_dist.config import ModelConfig
from gptoss_dist.sharding import constrain, logical_to_spec, mesh_sizes, param_formats

F32 = jnp.float32

# A stack of expert matrices [E, in, out]: dense, or MXFP4 as the checkpoint stores them.
Matrices = jax.Array | mxfp4.PackedMatrices
# How the experts run (`experts_function`): the platform's best, XLA's grouped matmul, a loop over row blocks,
# or a Pallas kernel (the GPU's, the TPU's).
EXPERTS_IMPLEMENTATIONS = ("auto", "ragged", "blocked", "gpu_kernel", "tpu_kernel")
# How a decode step reads the pool of pages (`paged_decode_kernel`): the platform's best, the portable blockwise
# path, or the TPU kernel that reads each sequence's own live pages.
ATTENTION_IMPLEMENTATIONS = ("auto", "blockwise", "tpu_kernel")
# The experts take a call's tokens in chunks (`routed_experts`) that bring each expert this many rows on average
# (`expert_chunk_tokens`): a chunk's token copies, sorted and padded to whole row blocks, are made for the chunk, not
# for the whole call, and each chunk reads its experts' weights again, which at 512 rows costs no more time than
# their matmuls (2 flops a bf16 weight a row: 512 per byte read, about a v6e's ratio of matmul to HBM speed, 560,
# and above v5e's, v5p's and tpu7x's).
CHUNK_ROWS_PER_EXPERT = 512
KERNEL_BLOCK_ROWS = 16  # the expert kernels' smallest row block (`row_blocks`)


def _param(
    rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], dtype, stddev: float, *, row_major: bool = False
) -> nnx.Param:
    """A random weight; `row_major` pins its layout on the device (`sharding.param_formats`)."""
    value = (jax.random.normal(rngs.params(), shape, F32) * stddev).astype(dtype)
    return nnx.Param(value, logical_axes=axes, row_major=row_major)


def _mxfp4_params(
    rngs: nnx.Rngs, shape: tuple[int, int, int], axes: tuple[str | None, ...], stddev: float
) -> tuple[nnx.Param, nnx.Param]:
    """Random MXFP4 blocks and scales of matrices [E, out, in] (the checkpoint's layout), with values of about
    `stddev`: uniform FP4 codes, whose root mean square is 2.93, under one scale."""
    count, fan_out, fan_in = shape
    groups = fan_in // mxfp4.VALUES_PER_BLOCK
    blocks = jax.random.bits(rngs.params(), (count, fan_out, groups, mxfp4.VALUES_PER_BLOCK // 2), jnp.uint8)
    scale = mxfp4.SCALE_BIAS + round(np.log2(stddev / 2.93))
    scales = jnp.full((count, fan_out, groups), scale, jnp.uint8)
    return (
        nnx.Param(blocks, logical_axes=(*axes, None)),
        nnx.Param(scales, logical_axes=axes, tpu_major_to_minor=tpu_grouped_matmul.SCALES_MAJOR_TO_MINOR),
    )


def _constant(shape: tuple[int, ...], axes: tuple[str, ...], dtype, fill: float) -> nnx.Param:
    return nnx.Param(jnp.full(shape, fill, dtype), logical_axes=axes)


# ---------------------------------------------------------------------------------------------- rotary


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """YaRN inverse frequencies (head_dim/2,), computed in float32 the way transformers does."""
    dim, base = cfg.head_dim, cfg.rope_theta

    def correction_dim(rotations: float) -> float:
        return dim * np.log(cfg.rope_original_max_position / (rotations * 2 * np.pi)) / (2 * np.log(base))

    low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = np.floor(low), np.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1 / (cfg.rope_factor * pos_freqs)) * (1 - extrapolation) + (1 / pos_freqs) * extrapolation
    return inv_freq.astype(np.float32)


def rope_cos_sin(positions: jax.Array, cfg: ModelConfig, dtype) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, T, head_dim/2] for integer positions [B, T], scaled by YaRN's attention factor."""
    angles = positions.astype(F32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
    scale = cfg.rope_attention_scale
    return (jnp.cos(angles) * scale).astype(dtype), (jnp.sin(angles) * scale).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Half-split rotation of x [B, T, heads, head_dim]."""
    first, second = jnp.split(x, 2, axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


# ------------------------------------------------------------------------------------------ attention


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Span:
    """Where the tokens [B, T] of a call sit in their sequences: index t of row b is position `first[b] + t`,
    a real token for `start[b] <= t < end[b]`. With a cache, row b's sequence is in cache slot `slot[b]`
    (out of range: a padding row, which writes nothing), or in slot b where `slot` is None; its full-attention
    layers' keys are in the pages `pages[b]` of their pool, or in page `slot[b]` where `pages` is None."""

    first: jax.Array  # [B] int32
    start: jax.Array  # [B] int32
    end: jax.Array  # [B] int32
    slot: jax.Array | None = None  # [B] int32
    pages: jax.Array | None = None  # [B, pages per sequence] int32

    def positions(self, length: int) -> jax.Array:
        return self.first[:, None] + jnp.arange(length)

    def slots(self) -> jax.Array:
        return jnp.arange(self.first.shape[0], dtype=jnp.int32) if self.slot is None else self.slot

    def page_table(self) -> jax.Array:
        """Each row's pages of the full-attention layers' pool [B, W]."""
        return self.slots()[:, None] if self.pages is None else self.pages

    @classmethod
    def from_mask(cls, valid: jax.Array) -> Span:
        """The span of a padded batch whose `valid` [B, T] marks one run of real tokens per row (padding on the
        left, the right or both), each starting at position 0."""
        count = valid.sum(axis=1, dtype=jnp.int32)
        start = jnp.where(count > 0, jnp.argmax(valid, axis=1), 0).astype(jnp.int32)
        return cls(first=-start, start=start, end=start + count)


# Logical axes of a layer's cached keys and values, beside the weights' axes: pages (a slot's ring, or a
# page of the full-attention layers' pool), heads, positions in a page, head_dim. Heads before positions: a
# head's run of positions is then contiguous, which is how attention reads it (`attention.KeySpan`).
CACHE_AXES = ("batch", "kv_heads", "cache_seq", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerCache:
    """One layer's keys and values side by side, kv [pages, kv_heads, page, 2 * head_dim] (`CACHE_AXES`,
    `attention.pair`). A sequence's keys are
    in the pages of its page table [W] one after the other, position p in page `table[p // page % W]` at
    p % page: a pool holds the whole context in pages taken as it grows (the full-attention layers'; a
    sliding layer's too where prefixes are shared, so that a sequence that starts from a cached prefix finds
    the window before it); a `ring` holds a sliding layer's window per slot, one page per slot."""

    kv: jax.Array
    ring: bool = dataclasses.field(default=False, metadata={"static": True})

    def write(self, kv: jax.Array, span: Span, pages: jax.Array) -> LayerCache:
        """The cache with the real tokens' keys and values kv [B, T, kv_heads, 2 * D] stored through the page
        table pages [B, W] (of more than W pages' worth, the last ones)."""
        page, count = self.kv.shape[2], pages.shape[1]
        t = jnp.arange(kv.shape[1])
        kept = (t >= jnp.maximum(span.start, span.end - page * count)[:, None]) & (t < span.end[:, None])
        positions = span.positions(kv.shape[1])
        index = jnp.take_along_axis(pages, positions // page % count, axis=1)
        index = jnp.where(kept, index, self.kv.shape[0])  # out of range: dropped
        offset = positions % page
        head = jnp.arange(self.kv.shape[1])
        # a row a head: written as whole rows of the pool, which the TPU compiler writes where they are stored
        at = (index[..., None], head, offset[..., None])  # each [B, T, kv_heads]
        return LayerCache(self.kv.at[at].set(kv.astype(self.kv.dtype), mode="drop"), self.ring)


def cache_length(cfg: ModelConfig, layer: int, max_len: int) -> int:
    """Positions a layer's cache keeps per sequence: its window for a sliding layer, the whole context for the
    others."""
    return min(cfg.window(layer) or max_len, max_len)


def cache_shape(
    cfg: ModelConfig, layer: int, slots: int, max_len: int, pool: tuple[int, int] | None = None, rings: bool = True
) -> tuple[int, int, int, int]:
    """The shape of a layer's cache: with `rings` a ring per slot for a sliding layer; for the others a pool
    of (pages, page size), by default a page of max_len per slot."""
    pages, page = (slots, max_len) if pool is None else pool
    if rings and cfg.window(layer) is not None:
        pages, page = slots, cache_length(cfg, layer, max_len)
    return (pages, cfg.num_kv_heads, page, 2 * cfg.head_dim)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, param_dtype, rngs: nnx.Rngs):
        hidden, heads, kv_heads, dim = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        std = hidden**-0.5
        self.q = _param(rngs, (hidden, heads, dim), ("embed", "q_heads", "head_dim"), param_dtype, std)
        self.q_bias = _constant((heads, dim), ("q_heads", "head_dim"), param_dtype, 0.0)
        self.k = _param(rngs, (hidden, kv_heads, dim), ("embed", "kv_heads", "head_dim"), param_dtype, std)
        self.k_bias = _constant((kv_heads, dim), ("kv_heads", "head_dim"), param_dtype, 0.0)
        self.v = _param(rngs, (hidden, kv_heads, dim), ("embed", "kv_heads", "head_dim"), param_dtype, std)
        self.v_bias = _constant((kv_heads, dim), ("kv_heads", "head_dim"), param_dtype, 0.0)
        self.o = _param(rngs, (heads, dim, hidden), ("q_heads", "head_dim", "embed"), param_dtype, (heads * dim) ** -0.5)
        self.o_bias = _constant((hidden,), ("embed",), param_dtype, 0.0)
        self.sinks = _constant((heads,), ("q_heads",), param_dtype, 0.0)
        self.window = cfg.window(layer)

    def qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Projects x [B, T, hidden] to rotated q [B, T, Hq, D], rotated k and v [B, T, Hkv, D]."""
        dtype = x.dtype
        q = jnp.einsum("bte,ehd->bthd", x, self.q[...].astype(dtype)) + self.q_bias[...].astype(dtype)
        k = jnp.einsum("bte,ehd->bthd", x, self.k[...].astype(dtype)) + self.k_bias[...].astype(dtype)
        v = jnp.einsum("bte,ehd->bthd", x, self.v[...].astype(dtype)) + self.v_bias[...].astype(dtype)
        q = constrain(q, ("batch", "seq", "q_heads", "head_dim"))
        k = constrain(k, ("batch", "seq", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "seq", "kv_heads", "head_dim"))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def project_out(self, attended: jax.Array) -> jax.Array:
        dtype = attended.dtype
        out = jnp.einsum("bthd,hde->bte", attended, self.o[...].astype(dtype)) + self.o_bias[...].astype(dtype)
        return constrain(out, ("batch", "seq", "embed"))

    def __call__(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, span: Span, cache: LayerCache | None, block: int,
        implementation: str = "auto",
    ) -> tuple[jax.Array, LayerCache | None]:  # fmt: skip
        """Attends the tokens x [B, T, hidden] at `span` to what they may see: each other and, with a cache,
        their sequences' earlier tokens. Returns the output and the cache holding the new keys too. A single
        token a row reading a pool goes to `paged_decode_kernel(implementation)` where it gives one."""
        q, k, v = self.qkv(x, cos, sin)
        kv = pair(k, v)
        own = KeySpan(kv, first=span.first, start=span.start, end=span.end)
        kernel = None
        if cache is None:
            spans = [own]
        elif not cache.ring:  # the cache holds the whole context: store, then read it
            cache = cache.write(kv, span, span.page_table())
            spans = [KeySpan(cache.kv, end=span.first + span.end, pages=span.page_table())]
            kernel = paged_decode_kernel(implementation, cache.kv.shape, block) if x.shape[1] == 1 else None
        else:  # a ring as long as the window: read what it held before the new keys replace it
            ring = span.slots()[:, None]
            spans = [KeySpan(cache.kv, end=span.first + span.start, pages=ring, ring=True), own]
            cache = cache.write(kv, span, ring)
        if kernel is None:
            out = attend(q, span.first, self.sinks[...], spans, self.window, block=block)
        else:
            out = kernel(q[:, 0], spans[0], self.sinks[...], self.window, block)[:, None]
        return self.project_out(out), cache


def paged_decode_kernel(implementation: str, pool_shape: tuple[int, ...], block: int) -> Callable | None:
    """The kernel that reads a pool [P, kv_heads, page, 2 * D] for one token a row (`ATTENTION_IMPLEMENTATIONS`),
    or None for the portable path: `tpu_kernel` (in Pallas' interpreter off a TPU), and `auto` on a TPU where
    the kernel can run on each device's own share: the KV heads split evenly over `tensor` (else they are
    replicated while the query heads are split), and the pieces it copies whole (16, 128) tiles. Where `data`
    splits the rows and the pool, each shard reads its own part: a row's pages must lie in its shard's part, as
    the engine's allocator places them (`paged_decode`)."""
    check_implementation("attention", implementation)
    platform = target_platform()
    if implementation == "blockwise" or (implementation == "auto" and platform != "tpu"):
        return None
    mesh = jax.sharding.get_abstract_mesh()
    sizes = {"data": 1, "tensor": 1} if mesh.empty else mesh_sizes(mesh)
    _, kv_heads, page, _ = pool_shape
    local_kv = kv_heads // sizes["tensor"]
    fits = kv_heads % sizes["tensor"] == 0
    if fits and (implementation == "tpu_kernel" or tpu_paged_attention.block_size(page, block) * local_kv % 16 == 0):
        return partial(paged_decode, interpret=platform != "tpu")
    if implementation == "auto":
        return None
    raise ValueError(f"attention_implementation='tpu_kernel' needs mesh.tensor dividing the {kv_heads} KV heads; "
                     f"the mesh is {sizes}")  # fmt: skip


def paged_decode(
    q: jax.Array, keys: KeySpan, sinks: jax.Array, window: int | None, block: int, *, interpret: bool
) -> jax.Array:
    """`tpu_paged_attention.paged_decode_attention` of q [B, Hq, D] over the pool and page table of `keys`, on
    each device's rows and heads where a mesh is set (see `paged_decode_kernel` for the meshes it takes). Where
    `data` splits the rows and the pool's pages, row b's pages must lie in the part of the pool on b's shard:
    each shard reads only its own part, through page numbers counted from the part's first page."""
    kernel = partial(tpu_paged_attention.paged_decode_attention, window=window, block=block, interpret=interpret)
    args = (q, keys.kv, keys.pages, keys.end, sinks)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(*args)

    def call(q, pool, pages, lengths, sinks):
        # a row's table past its live pages may hold numbers from elsewhere: kept in range, and never read
        local = jnp.clip(pages - jax.lax.axis_index("data") * pool.shape[0], 0, pool.shape[0] - 1)
        return kernel(q, pool, local, lengths, sinks)

    sizes = mesh_sizes(mesh)
    axes = (("batch", "q_heads", "head_dim"), CACHE_AXES, ("batch", None), ("batch",), ("q_heads",))
    specs = tuple(logical_to_spec(names, arg.shape, sizes) for names, arg in zip(axes, args, strict=True))
    # check_vma=False: pallas_call's output type does not say how it varies over the mesh
    return jax.shard_map(call, mesh=mesh, in_specs=specs, out_specs=specs[0], check_vma=False)(*args)


def check_implementation(part: str, implementation: str) -> None:
    """Refuses a `{part}_implementation` ("attention" or "experts") that is not one of that part's names."""
    choices = {"attention": ATTENTION_IMPLEMENTATIONS, "experts": EXPERTS_IMPLEMENTATIONS}[part]
    if implementation not in choices:
        raise ValueError(f"{part}_implementation must be one of {choices}, not {implementation!r}")


# ------------------------------------------------------------------------------------------------- MoE


def clamped_swiglu(gate_up: jax.Array, limit: float, alpha: float) -> jax.Array:
    """GPT-OSS's activation on interleaved columns (gate even, up odd) -> [..., intermediate]."""
    gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
    gate = jnp.minimum(gate, limit)
    up = jnp.clip(up, -limit, limit)
    return gate * jax.nn.sigmoid(alpha * gate) * (up + 1)


def route(x: jax.Array, router: jax.Array, router_bias: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """Float32 router over tokens x [N, hidden]: the chosen experts [N, k] and their softmaxed weights [N, k]."""
    logits = x.astype(F32) @ router.astype(F32) + router_bias.astype(F32)
    top_logits, experts = jax.lax.top_k(logits, top_k)
    return experts, jax.nn.softmax(top_logits, axis=-1)


def expert_chunk_tokens(cfg: ModelConfig) -> int:
    """The tokens a chunk of `routed_experts` takes: CHUNK_ROWS_PER_EXPERT rows an expert on average (4,096
    tokens for the 20B, 16,384 for the 120B)."""
    return CHUNK_ROWS_PER_EXPERT * cfg.num_experts // cfg.experts_per_token


def routed_experts(
    x: jax.Array,
    experts: jax.Array,
    weights: jax.Array,
    gate_up: Matrices,
    gate_up_bias: jax.Array,
    down: Matrices,
    down_bias: jax.Array,
    *,
    limit: float,
    alpha: float,
    implementation: str = "auto",
    first_expert: jax.Array | int = 0,
    chunk_tokens: int,
    sum_over: tuple[str, ...] = (),
) -> jax.Array:
    """Sum over each token's chosen experts of weight * expert(token), for the experts held here.

    x [N, hidden]; experts and weights [N, k]; the expert weights hold experts first_expert.. of the model
    ([E_here, hidden, 2I], [E_here, I, hidden], ...). Token copies are sorted by expert so that each expert
    runs only on the tokens routed to it, and copies routed to experts held elsewhere contribute zero.
    No token is dropped. `implementation` names how the experts run (see `experts_function`). More than
    `chunk_tokens` tokens run `chunk_tokens` at a time, one chunk after another; the last is padded with
    tokens routed to no expert held here. Each chunk's sums are added in float32, over the mesh axes
    `sum_over` too (inside a `shard_map`: the devices holding the other experts and columns), and kept in x's
    dtype. Returns [N, hidden] in x's dtype.
    """
    expert_args = (gate_up, gate_up_bias, down, down_bias)
    options = {"limit": limit, "alpha": alpha, "implementation": implementation, "first_expert": first_expert}

    def run(x: jax.Array, experts: jax.Array, weights: jax.Array) -> jax.Array:
        out = _routed_chunk(x, experts, weights, *expert_args, **options)
        if sum_over:
            with jax.named_scope("collectives"):
                out = jax.lax.psum(out, sum_over)
        return out.astype(x.dtype)

    num_tokens = x.shape[0]
    if num_tokens <= chunk_tokens:
        return run(x, experts, weights)
    count = -(-num_tokens // chunk_tokens)

    def chunks(a: jax.Array, fill) -> jax.Array:
        padded = jnp.pad(a, ((0, count * chunk_tokens - num_tokens), (0, 0)), constant_values=fill)
        return padded.reshape(count, chunk_tokens, a.shape[1])

    # padding tokens choose expert -1, held nowhere: they cost no expert any rows
    out = jax.lax.map(lambda chunk: run(*chunk), (chunks(x, 0), chunks(experts, -1), chunks(weights, 0)))
    return out.reshape(count * chunk_tokens, -1)[:num_tokens]


def _routed_chunk(x, experts, weights, gate_up, gate_up_bias, down, down_bias, *, limit, alpha, implementation,
                  first_expert) -> jax.Array:  # fmt: skip
    """`routed_experts` on all of x's tokens at once, here only; float32."""
    num_here = gate_up.shape[0]
    local = experts.reshape(-1) - first_expert
    group = jnp.where((local >= 0) & (local < num_here), local, num_here)  # num_here: held elsewhere
    order = jnp.argsort(group, stable=True)
    sizes = jnp.bincount(group, length=num_here + 1)[:num_here].astype(jnp.int32)
    ffn = partial(experts_function(implementation, gate_up), limit=limit, alpha=alpha)
    out = ffn(x[order // experts.shape[1]], group[order], sizes, gate_up, gate_up_bias, down, down_bias)
    # each token's rows gathered back and summed in float32, one of its k rows at a time (a scatter-add, or one
    # sum over the k rows, makes float32 copies of all of them)
    row_of = jnp.argsort(order).reshape(experts.shape)  # [N, k]: where each token's copies are in `out`
    held_weights = jnp.where(group.reshape(experts.shape) < num_here, weights, 0.0).astype(F32)
    return sum(out[row_of[:, j]].astype(F32) * held_weights[:, j, None] for j in range(experts.shape[1]))


def target_platform() -> str:
    """The platform the program is built for: that of the mesh's devices (`jax.set_mesh`), which may be a TPU
    topology's while compiling on another machine (`gptoss_dist.compile`), else JAX's default backend."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.platform if device is not None else jax.default_backend()


# The Pallas expert kernels by implementation name: the platform each is built for, and its grouped matmul.
EXPERTS_KERNELS = {
    "gpu_kernel": ("gpu", grouped_matmul.grouped_matmul),
    "tpu_kernel": ("tpu", tpu_grouped_matmul.grouped_matmul),
}


def experts_function(implementation: str, gate_up: Matrices) -> Callable:
    """The function that runs the experts on rows sorted by expert, by name (`EXPERTS_IMPLEMENTATIONS`):
    `ragged` XLA's grouped matmul, `blocked` a loop over row blocks, `gpu_kernel` and `tpu_kernel` the Pallas
    kernels (Triton, `grouped_matmul`; Mosaic, `tpu_grouped_matmul`), each in Pallas' interpreter where the
    target is not its platform, and `auto` the target platform's best: the GPU kernel on GPUs; on TPUs the TPU
    kernel for packed weights and the grouped matmul for dense ones (XLA's own Mosaic kernel); else the loop."""
    platform = target_platform()
    if implementation == "auto":
        tpu_ragged = platform == "tpu" and not isinstance(gate_up, mxfp4.PackedMatrices)
        implementation = "ragged" if tpu_ragged else f"{platform}_kernel" if platform in ("gpu", "tpu") else "blocked"
    if implementation in EXPERTS_KERNELS:
        own_platform, matmul = EXPERTS_KERNELS[implementation]
        return partial(experts_kernel, matmul=matmul, interpret=platform != own_platform)
    return {"ragged": experts_ragged, "blocked": experts_blocked}[implementation]


def experts_ragged(rows, row_group, sizes, gate_up, gate_up_bias, down, down_bias, *, limit, alpha):
    """The experts on rows sorted by expert, as two grouped matmuls (`ragged_dot`). TPUs run these natively;
    elsewhere XLA expands them into dense matmuls over every expert."""
    expert = jnp.minimum(row_group, gate_up.shape[0] - 1)
    dtype = rows.dtype
    hidden = jax.lax.ragged_dot(rows, gate_up.astype(dtype), sizes) + gate_up_bias.astype(dtype)[expert]
    activated = clamped_swiglu(hidden, limit, alpha)
    return jax.lax.ragged_dot(activated, down.astype(dtype), sizes) + down_bias.astype(dtype)[expert]


@dataclasses.dataclass(frozen=True)
class RowBlocks:
    """Rows sorted by expert, each expert's rows padded to whole blocks of `size` rows, so that every block
    belongs to one expert."""

    size: int
    slot: jax.Array  # [rows]: each row's place in the padded layout; past the end for rows held elsewhere
    expert: jax.Array  # [blocks]: each block's expert; num_experts for a block no row uses

    def pad(self, rows: jax.Array) -> jax.Array:
        padded = jnp.zeros((self.expert.shape[0] * self.size, rows.shape[1]), rows.dtype)
        return padded.at[self.slot].set(rows, mode="drop")

    def unpad(self, padded: jax.Array) -> jax.Array:
        return padded.at[self.slot].get(mode="fill", fill_value=0)


def block_layout(num_rows: int, num_experts: int, smallest: int) -> tuple[int, int]:
    """(rows a block, blocks) of `row_blocks`' layout for `num_rows` rows over `num_experts` experts: blocks of
    `smallest`..128 rows, about num_rows/num_experts, and as many blocks as any routing fills."""
    size = int(np.clip(_next_power_of_2(num_rows // num_experts), smallest, 128))
    # Each expert in use pads its rows by at most size - 1, so this many blocks hold any routing.
    return size, (num_rows + min(num_experts, num_rows) * (size - 1)) // size


def row_blocks(row_group: jax.Array, sizes: jax.Array, num_experts: int, smallest: int) -> RowBlocks:
    """The padded layout of rows sorted by expert (`row_group` [rows], num_experts for rows held elsewhere;
    `sizes` [num_experts] rows per expert), with blocks of `smallest`..128 rows, about rows/num_experts."""
    num_rows = row_group.shape[0]
    size, num_blocks = block_layout(num_rows, num_experts, smallest)
    blocks_of = -(-sizes // size)
    first_row = (jnp.cumsum(blocks_of) - blocks_of) * size  # of each expert, in the padded layout
    group = jnp.minimum(row_group, num_experts - 1)
    rank = jnp.arange(num_rows) - (jnp.cumsum(sizes) - sizes)[group]
    slot = jnp.where(row_group < num_experts, first_row[group] + rank, num_blocks * size)
    # compare_all: one fused comparison; the default binary search is a loop, which a GPU runs from the host
    expert = jnp.searchsorted(jnp.cumsum(blocks_of), jnp.arange(num_blocks), side="right", method="compare_all")
    return RowBlocks(size, slot, expert.astype(jnp.int32))


def expert_matrix(weights: Matrices, expert: jax.Array, dtype) -> jax.Array:
    """One expert's matrix [in, out] in `dtype` (dequantized if packed)."""
    if isinstance(weights, mxfp4.PackedMatrices):
        return weights.matrix(expert, dtype)
    return weights[expert].astype(dtype)


def experts_blocked(rows, row_group, sizes, gate_up, gate_up_bias, down, down_bias, *, limit, alpha):
    """The experts on rows sorted by expert, block by block: a loop runs each used block through its expert's
    weights (blocks past the used ones are skipped), so the work and the weights read follow the routing, and
    packed weights are dequantized one expert at a time."""
    num_experts = gate_up.shape[0]
    blocks = row_blocks(row_group, sizes, num_experts, smallest=8)

    def run_block(_, block_and_expert):
        x, expert = block_and_expert

        def ffn():
            e = jnp.minimum(expert, num_experts - 1)
            hidden = x @ expert_matrix(gate_up, e, x.dtype) + gate_up_bias[e].astype(x.dtype)
            activated = clamped_swiglu(hidden, limit, alpha)
            return activated @ expert_matrix(down, e, x.dtype) + down_bias[e].astype(x.dtype)

        zeros = jnp.zeros((blocks.size, down.shape[-1]), x.dtype)
        return None, jax.lax.cond(expert < num_experts, ffn, lambda: zeros)

    padded = blocks.pad(rows).reshape(-1, blocks.size, rows.shape[1])
    _, out = jax.lax.scan(run_block, None, (padded, blocks.expert))
    return blocks.unpad(out.reshape(-1, out.shape[-1]))


def experts_kernel(
    rows, row_group, sizes, gate_up, gate_up_bias, down, down_bias, *, limit, alpha, matmul: Callable,
    interpret: bool = False,
):  # fmt: skip
    """The experts on rows sorted by expert as two grouped matmuls, each a kernel (`matmul`: the GPU's
    `grouped_matmul` or the TPU's `tpu_grouped_matmul`) that reads only the used experts' weights, in place,
    dequantizing packed ones a tile at a time; `interpret` runs it with Pallas' interpreter."""
    blocks = row_blocks(row_group, sizes, gate_up.shape[0], smallest=KERNEL_BLOCK_ROWS)
    blocks_times = partial(matmul, block_expert=blocks.expert, block_rows=blocks.size, interpret=interpret)
    hidden = blocks_times(blocks.pad(rows), gate_up, gate_up_bias)
    out = blocks_times(clamped_swiglu(hidden, limit, alpha), down, down_bias)
    return blocks.unpad(out)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


class MoE(nnx.Module):
    """Top-k routed experts. With `packed`, the expert matrices stay as the checkpoint's MXFP4 blocks and
    scales (uint8, the Hugging Face layout byte for byte) and are dequantized inside the expert matmuls.
    `implementation` names how the experts run (`experts_function`)."""

    def __init__(
        self, cfg: ModelConfig, *, param_dtype, packed: bool = False, implementation: str = "auto", rngs: nnx.Rngs
    ):
        check_implementation("experts", implementation)
        hidden, inter, num = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
        self.router = _param(rngs, (hidden, num), ("embed", "router_experts"), param_dtype, hidden**-0.5)
        self.router_bias = _constant((num,), ("router_experts",), param_dtype, 0.0)
        if packed:
            gate_up_axes, down_axes = ("experts", "expert_mlp", "embed"), ("experts", "embed", "expert_mlp")
            self.gate_up_blocks, self.gate_up_scales = _mxfp4_params(
                rngs, (num, 2 * inter, hidden), gate_up_axes, hidden**-0.5
            )
            self.down_blocks, self.down_scales = _mxfp4_params(rngs, (num, hidden, inter), down_axes, inter**-0.5)
        else:
            gate_up_axes, down_axes = ("experts", "embed", "expert_mlp"), ("experts", "expert_mlp", "embed")
            # row-major, as the TPU's grouped matmul reads them (see `sharding.param_formats`)
            self.gate_up = _param(
                rngs, (num, hidden, 2 * inter), gate_up_axes, param_dtype, hidden**-0.5, row_major=True
            )
            self.down = _param(rngs, (num, inter, hidden), down_axes, param_dtype, inter**-0.5, row_major=True)
        self.gate_up_bias = _constant((num, 2 * inter), ("experts", "expert_mlp"), param_dtype, 0.0)
        self.down_bias = _constant((num, hidden), ("experts", "embed"), param_dtype, 0.0)
        self.packed, self.implementation = packed, implementation
        self.top_k, self.limit, self.alpha = cfg.experts_per_token, cfg.swiglu_limit, cfg.swiglu_alpha
        self.chunk_tokens = expert_chunk_tokens(cfg)

    def expert_variables(self) -> tuple:
        """(gate_up, gate_up_bias, down, down_bias) as variables; packed matrices as `PackedMatrices`."""
        if self.packed:
            gate_up = mxfp4.PackedMatrices(self.gate_up_blocks, self.gate_up_scales)
            down = mxfp4.PackedMatrices(self.down_blocks, self.down_scales)
        else:
            gate_up, down = self.gate_up, self.down
        return gate_up, self.gate_up_bias, down, self.down_bias

    def __call__(self, x: jax.Array) -> jax.Array:
        tokens = constrain(x.reshape(-1, x.shape[-1]), ("batch", "embed"))
        with jax.named_scope("routing"):
            experts, weights = route(tokens, self.router[...], self.router_bias[...], self.top_k)
        variables = self.expert_variables()
        params = jax.tree.map(lambda var: var[...], variables, is_leaf=_is_variable)
        options = dict(
            limit=self.limit, alpha=self.alpha, implementation=self.implementation, chunk_tokens=self.chunk_tokens
        )
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            with jax.named_scope("experts"):
                out = routed_experts(tokens, experts, weights, *params, **options)
        else:
            axes = jax.tree.map(lambda var: var.get_metadata()["logical_axes"], variables, is_leaf=_is_variable)
            out = expert_parallel(mesh, tokens, experts, weights, params, axes, **options)
        return out.reshape(x.shape)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def expert_parallel(
    mesh, tokens, experts, weights, params: tuple, param_axes: tuple, *, limit: float, alpha: float,
    implementation: str = "auto", chunk_tokens: int,
) -> jax.Array:  # fmt: skip
    """`routed_experts` over the mesh: each device runs only its experts (`expert` axis) and its slice of
    their intermediate dimension (`tensor` axis) on its data shard's tokens, and a sum over both axes
    combines the partial results. Expert weights never move. `param_axes` holds the logical axes of each
    array in `params`."""
    sizes = mesh_sizes(mesh)
    token_spec = logical_to_spec(("batch", "embed"), tokens.shape, sizes)
    route_spec = logical_to_spec(("batch", None), experts.shape, sizes)
    param_specs = jax.tree.map(lambda p, axes: logical_to_spec(axes, p.shape, sizes), params, param_axes)

    def local(tokens, experts, weights, params):
        gate_up, gate_up_bias, down, down_bias = params
        first_expert = jax.lax.axis_index("expert") * gate_up.shape[0]
        down_bias = jnp.where(jax.lax.axis_index("tensor") == 0, down_bias, 0)  # add the bias once
        with jax.named_scope("experts"):
            return routed_experts(
                tokens, experts, weights, gate_up, gate_up_bias, down, down_bias, limit=limit, alpha=alpha,
                implementation=implementation, first_expert=first_expert, chunk_tokens=chunk_tokens,
                sum_over=("tensor", "expert"),
            )  # fmt: skip

    # check_vma=False: the blocked experts' lax.cond has a branch that reads no expert weights
    return jax.shard_map(
        local, mesh=mesh, in_specs=(token_spec, route_spec, route_spec, param_specs), out_specs=token_spec,
        check_vma=False,
    )(tokens, experts, weights, params)


# ------------------------------------------------------------------------------------------- the model


class RMSNorm(nnx.Module):
    def __init__(self, size: int, eps: float, *, param_dtype):
        self.scale = _constant((size,), ("embed",), param_dtype, 1.0)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(F32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.scale[...].astype(F32) * normed).astype(x.dtype)


class DecoderLayer(nnx.Module):
    def __init__(
        self, cfg: ModelConfig, layer: int, *, param_dtype, packed_experts: bool, experts_implementation: str = "auto",
        rngs: nnx.Rngs,
    ):  # fmt: skip
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.attn = Attention(cfg, layer, param_dtype=param_dtype, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MoE(
            cfg, param_dtype=param_dtype, packed=packed_experts, implementation=experts_implementation, rngs=rngs
        )

    def __call__(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, span: Span, cache: LayerCache | None, block: int,
        attention_implementation: str = "auto",
    ) -> tuple[jax.Array, LayerCache | None]:  # fmt: skip
        with jax.named_scope("attention"):
            attended, cache = self.attn(self.attn_norm(x), cos, sin, span, cache, block, attention_implementation)
        x = x + attended
        return x + self.mlp(self.mlp_norm(x)), cache


def vocab_parallel_lookup(mesh, table: jax.Array, tokens: jax.Array) -> jax.Array:
    """table[tokens] with the table's vocabulary sharded: each device looks up the ids in its own rows and a
    sum over the vocabulary's mesh axes assembles the result, so the table is never gathered."""
    sizes = mesh_sizes(mesh)
    table_spec = logical_to_spec(("vocab", "embed"), table.shape, sizes)
    vocab_axes = table_spec[0] or ()
    vocab_axes = (vocab_axes,) if isinstance(vocab_axes, str) else vocab_axes

    def local(table, tokens):
        first = jax.lax.axis_index(vocab_axes) * table.shape[0] if vocab_axes else 0
        index = tokens - first
        held = (index >= 0) & (index < table.shape[0])
        rows = jnp.where(held[..., None], table[jnp.clip(index, 0, table.shape[0] - 1)], 0)
        if not vocab_axes:
            return rows
        with jax.named_scope("collectives"):
            return jax.lax.psum(rows, vocab_axes)

    token_spec = logical_to_spec(("batch", "seq"), tokens.shape, sizes)
    out_spec = logical_to_spec(("batch", "seq", "embed"), (*tokens.shape, table.shape[1]), sizes)
    return jax.shard_map(local, mesh=mesh, in_specs=(table_spec, token_spec), out_specs=out_spec)(table, tokens)


class GptOss(nnx.Module):
    """The causal language model: int token ids [B, T] -> float32 logits [B, T, vocab]. With
    `packed_experts` the expert weights stay MXFP4 (see `MoE`); `experts_implementation` (one of
    `EXPERTS_IMPLEMENTATIONS`) names how the experts run (`experts_function`)."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        param_dtype=jnp.bfloat16,
        compute_dtype=None,
        rngs: nnx.Rngs | None = None,
        packed_experts: bool = False,
        experts_implementation: str = "auto",
    ):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.compute_dtype = compute_dtype or param_dtype
        # row-major, as the lookup reads it (see `sharding.param_formats`)
        self.embed = _param(
            rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), param_dtype, 1.0, row_major=True
        )
        self.layers = nnx.List(
            [
                DecoderLayer(
                    cfg, i, param_dtype=param_dtype, packed_experts=packed_experts,
                    experts_implementation=experts_implementation, rngs=rngs,
                )  # fmt: skip
                for i in range(cfg.num_layers)
            ]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.unembed = _param(
            rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), param_dtype, cfg.hidden_size**-0.5
        )

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        mesh = jax.sharding.get_abstract_mesh()
        table = self.embed[...]
        rows = table[tokens] if mesh.empty else vocab_parallel_lookup(mesh, table, tokens)
        return constrain(rows.astype(self.compute_dtype), ("batch", "seq", "embed"))

    def logits(self, x: jax.Array) -> jax.Array:
        x = self.norm(x)
        logits = jnp.einsum("bte,ev->btv", x, self.unembed[...].astype(x.dtype), preferred_element_type=F32)
        return constrain(logits, ("batch", "seq", "vocab"))

    def __call__(
        self, tokens: jax.Array, attention_mask: jax.Array | None = None, *, attention_block: int = DEFAULT_BLOCK
    ) -> jax.Array:
        """tokens [B, T]; attention_mask [B, T] marks real tokens: one run a row, padding on the left or the
        right. Each row's first real token is at position 0."""
        valid = jnp.ones(tokens.shape, bool) if attention_mask is None else attention_mask.astype(bool)
        hidden, _ = self.hidden_states(tokens, Span.from_mask(valid), attention_block=attention_block)
        return self.logits(hidden)

    def hidden_states(
        self,
        tokens: jax.Array,
        span: Span,
        caches: Sequence[LayerCache] | None = None,
        *,
        attention_block: int = DEFAULT_BLOCK,
        attention_implementation: str = "auto",
    ) -> tuple[jax.Array, list[LayerCache] | None]:
        """The last layer's output [B, T, hidden] for tokens at `span`, and with `caches` (one per layer) the
        caches with the tokens' keys and values added. Attention runs in blocks of `attention_block`; a decode
        step reads a pool as `attention_implementation` says (`paged_decode_kernel`)."""
        x = self.embed_tokens(tokens)
        cos, sin = rope_cos_sin(span.positions(tokens.shape[1]), self.config, x.dtype)
        updated = []
        for index, layer in enumerate(self.layers):
            cache = None if caches is None else caches[index]
            x, cache = layer(x, cos, sin, span, cache, attention_block, attention_implementation)
            updated.append(cache)
        return x, None if caches is None else updated



def abstract_model(
    cfg: ModelConfig, *, dtype=jnp.bfloat16, compute_dtype=None, packed_experts: bool = False,
    experts_implementation: str = "auto",
) -> GptOss:  # fmt: skip
    """The model's structure with shapes and dtypes only: nothing is allocated."""
    return nnx.eval_shape(
        lambda: GptOss(cfg, param_dtype=dtype, compute_dtype=compute_dtype, packed_experts=packed_experts,
                       experts_implementation=experts_implementation)  # fmt: skip
    )


@nnx.jit
def forward(model: GptOss, tokens: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """`model(tokens, attention_mask)` compiled."""
    return model(tokens, attention_mask)


def random_model(
    cfg: ModelConfig,
    *,
    dtype=jnp.bfloat16,
    mesh: jax.sharding.Mesh | None = None,
    seed: int = 0,
    packed_experts: bool = False,
    experts_implementation: str = "auto",
) -> GptOss:
    """A model with random weights, each created on the devices in its sharding (for benchmarks).

    Each part is made by its own compiled function, one per kind of layer, called with its own key: a single
    function for the whole model takes minutes to compile at the 20B shape.
    """
    options = dict(param_dtype=dtype, packed_experts=packed_experts, experts_implementation=experts_implementation)
    model = nnx.eval_shape(lambda: GptOss(cfg, **options))
    keys = iter(jax.random.split(jax.random.key(seed), cfg.num_layers + 1))
    outer = dataclasses.replace(cfg, num_layers=0, layer_types=())  # the embeddings and the final norm
    nnx.update(model, _initializer(lambda rngs: GptOss(outer, rngs=rngs, **options), mesh)(next(keys)))
    initializers = {}
    for index, layer in enumerate(model.layers):
        kind = cfg.layer_types[index]
        if kind not in initializers:
            initializers[kind] = _initializer(partial(DecoderLayer, cfg, index, **options), mesh)
        nnx.update(layer, initializers[kind](next(keys)))
    return model


def _initializer(build: Callable[..., nnx.Module], mesh) -> Callable[[jax.Array], nnx.State]:
    """A compiled maker of the parameters of `build(rngs=...)` from a key, on the devices of their shardings."""
    abstract = nnx.state(nnx.eval_shape(lambda: build(rngs=nnx.Rngs(0))))
    formats = param_formats(abstract, mesh) if mesh is not None else None
    return jax.jit(lambda key: nnx.state(build(rngs=nnx.Rngs(params=key))), out_shardings=formats)
