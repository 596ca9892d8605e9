"""The TPU paged decode attention kernel (Pallas' interpreter on the CPU) against the portable blockwise path
reading the same pool through the same page tables; in the engine, `test_paged.py`."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_dist import compile as tpu_compile
from gptoss_dist.attention import KeySpan, attend
from gptoss_dist.model import paged_decode_kernel
from gptoss_dist.sharding import MESH_AXES
from gptoss_dist.tpu_paged_attention import KERNEL_NAME, SMEM_ROW, paged_decode_attention, rows_per_call

PAGE, WIDTH, KV, GROUP, DIM = 8, 6, 2, 4, 16


def pool_and_tables(rng, lengths, dtype):
    """A pool of shuffled pages, each row's table pointing at its own pages (unused entries: page 0)."""
    batch = len(lengths)
    pool = rng.normal(size=(batch * WIDTH + 3, KV, PAGE, 2 * DIM)).astype(np.float32)
    order = rng.permutation(pool.shape[0])[: batch * WIDTH].reshape(batch, WIDTH)
    live = np.arange(WIDTH)[None] * PAGE < np.asarray(lengths)[:, None]
    pages = np.where(live, order, 0).astype(np.int32)
    q = rng.normal(size=(batch, KV * GROUP, DIM)).astype(np.float32)
    sinks = rng.normal(size=KV * GROUP).astype(np.float32)
    return jnp.asarray(q, dtype), jnp.asarray(pool, dtype), jnp.asarray(pages), jnp.asarray(sinks)


def portable(q, pool, pages, lengths, sinks, window):
    span = KeySpan(pool, end=lengths, pages=pages)
    out = attend(q[:, None], lengths - 1, sinks, [span], window, block=PAGE)
    return out[:, 0]


@pytest.mark.parametrize(
    ("window", "block", "dtype", "calls"),
    [(None, 512, jnp.float32, 1), (12, 4, jnp.float32, 1), (12, 512, jnp.bfloat16, 1), (12, 4, jnp.float32, 3)],
)
def test_kernel_equals_the_portable_path(window, block, dtype, calls):
    """Rows of no key, part of a page, whole pages and the whole table; a window that starts mid-page; pieces
    of a whole page and of half a page; the rows split over calls whose page tables fit a smaller SMEM."""
    lengths = jnp.asarray([0, 3, 8, 21, WIDTH * PAGE], jnp.int32)
    q, pool, pages, sinks = pool_and_tables(np.random.default_rng(0), lengths, dtype)
    table_bytes = 4 * (SMEM_ROW + 1) * -(-len(lengths) // calls)  # room for the rows of one of `calls` calls
    kernel = partial(paged_decode_attention, window=window, block=block, table_bytes=table_bytes, interpret=True)
    got = jax.jit(kernel)(q, pool, pages, lengths, sinks)
    assert str(jax.make_jaxpr(kernel)(q, pool, pages, lengths, sinks)).count("pallas_call[") == calls
    expected = jax.jit(portable, static_argnames="window")(q, pool, pages, lengths, sinks, window)
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32),
                               rtol=tolerance, atol=tolerance)  # fmt: skip
    assert np.all(np.asarray(got[0]) == 0)  # a row that sees no key attends to nothing



@pytest.mark.parametrize(
    ("platform", "mesh", "kv_heads", "page", "kernel"),
    [("cpu", (1, 2, 1), 8, 64, False), ("tpu", (1, 2, 2), 8, 64, True), ("tpu", (2, 2, 1), 8, 64, True),
     ("tpu", (1, 4, 1), 2, 64, False), ("tpu", (1, 2, 1), 2, 8, False)],  # fmt: skip
)
def test_auto_takes_the_kernel_on_a_tpu_where_each_device_holds_its_rows(platform, mesh, kv_heads, page, kernel):
    """`auto` reads the pool with the kernel on a TPU mesh whose `tensor` axis divides the KV heads (each data
    shard's rows read its part of the pool), in pieces of whole (16, 128) tiles; elsewhere the portable path.
    Asking for the kernel where the mesh does not let it run is refused, naming the setting."""
    devices = tpu_compile.load_topology("v5e:2x2").devices if platform == "tpu" else jax.devices()[:4]
    pool = (16, kv_heads, page, 128)
    with jax.set_mesh(jax.sharding.Mesh(np.array(devices[: np.prod(mesh)]).reshape(mesh), MESH_AXES)):
        assert (paged_decode_kernel("auto", pool, 512) is not None) == kernel
        assert paged_decode_kernel("blockwise", pool, 512) is None
        if platform == "tpu" and kv_heads % mesh[1]:
            with pytest.raises(ValueError, match="attention_implementation='tpu_kernel' needs mesh.tensor dividing"):
                paged_decode_kernel("tpu_kernel", pool, 512)
    with pytest.raises(ValueError, match="attention_implementation must be one of"):
        paged_decode_kernel("paged", pool, 512)


@pytest.mark.parametrize("width", [1, 128])
def test_a_batch_whose_page_table_outgrows_smem_compiles_for_a_tpu(width):
    """The kernel prefetches its rows' page table into SMEM (1 MiB on every TPU generation), rows padded to 128
    entries: 3,000 rows (1.5 MiB of table, of one page or of 128) go to the kernel in calls that each fit, and
    compile for a v5e chip."""
    batch, kv_heads, group, dim, page = 3000, 8, 8, 64, 8192 // width
    device = jax.sharding.SingleDeviceSharding(tpu_compile.load_topology("v5e:2x2").devices[0])
    shapes = [((batch, kv_heads * group, dim), jnp.bfloat16), ((64, kv_heads, page, 2 * dim), jnp.bfloat16),
              ((batch, width), jnp.int32), ((batch,), jnp.int32), ((kv_heads * group,), jnp.float32)]  # fmt: skip
    args = [jax.ShapeDtypeStruct(shape, dtype, sharding=device) for shape, dtype in shapes]
    compiled = jax.jit(paged_decode_attention).lower(*args).compile()
    calls = [line for line in compiled.as_text().splitlines() if f"%{KERNEL_NAME}." in line.split("=")[0]]
    assert len(calls) == -(-batch // rows_per_call(width)) == 3
    with pytest.raises(ValueError, match="a page table row of 200000 pages does not fit in 524288 bytes of SMEM"):
        rows_per_call(200_000)
