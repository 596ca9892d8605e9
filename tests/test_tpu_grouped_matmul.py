"""The TPU expert kernel (`gptoss_dist.tpu_grouped_matmul`), run by Pallas' interpreter on the CPU."""

import functools
import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_config
from expert_kernels import EXPERTS, check_kernel_matches_reference
from jax.experimental.layout import Format, Layout
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding
from reference import load_reference, reference_logits
from test_compile import small_settings

from gptoss_dist import compile as tpu_compile
from gptoss_dist import from_pretrained, mxfp4
from gptoss_dist.model import forward
from gptoss_dist.sharding import make_mesh, put
from gptoss_dist.tpu_grouped_matmul import KERNEL_NAME, SCALES_MAJOR_TO_MINOR, grouped_matmul

# 9 scale groups of inputs (decoded 8, then 1); 200 outputs in tiles of 128: the last tile is partial, as at 2880.
FAN_IN, FAN_OUT, TILE_OUT = 288, 200, 128
DTYPES = pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
PACKED = pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])


def _check_routing(group: np.ndarray, packed: bool, dtype) -> None:
    kernel = functools.partial(grouped_matmul, tile_out=TILE_OUT, interpret=True)
    check_kernel_matches_reference(kernel, group, packed=packed, dtype=dtype, fan_in=FAN_IN, fan_out=FAN_OUT)


@PACKED
@DTYPES
def test_experts_of_no_row_one_row_and_more_than_a_block(packed, dtype):
    """Expert 0 has no row, 1 one row, 2 more rows than a block (16), 3 a few; 3 rows are held elsewhere (an
    uneven shard over `expert`), and the block left over is unused."""
    group = np.repeat(np.arange(EXPERTS + 1), [0, 1, 20, 5, 3])
    _check_routing(group, packed, dtype)


@PACKED
def test_every_row_on_one_expert(packed):
    _check_routing(np.full(40, 2), packed, jnp.bfloat16)


PROMPTS = np.random.default_rng(0).integers(0, small_config().vocab_size, (2, 12))


def packed_model(checkpoint, experts_implementation: str, mesh=None):
    return from_pretrained(checkpoint, dtype=jnp.float32, mesh=mesh, packed_experts=True,
                           experts_implementation=experts_implementation)  # fmt: skip


def test_model_through_the_kernel_matches_transformers_on_a_packed_checkpoint(small_checkpoint):
    """The whole model with the TPU expert path (interpreted), packed experts, gives transformers' logits
    within the tolerance the model meets on its own path (`test_model`)."""
    logits = np.asarray(forward(packed_model(small_checkpoint, "tpu_kernel"), jnp.asarray(PROMPTS)))
    reference = load_reference(small_checkpoint)
    for row, prompt in enumerate(PROMPTS):
        expected = reference_logits(reference, prompt)
        assert np.abs(logits[row] - expected).max() <= 1e-4 * np.abs(expected).max(), f"prompt {row}"


def test_expert_parallel_through_the_kernel_equals_the_unsharded_model(small_checkpoint):
    """On 2 tensor x 2 expert shards (3 experts each, the rows routed to the other shard's experts held
    elsewhere), the kernel's logits are the unsharded model's on the CPU's path."""
    unsharded_logits = np.asarray(forward(packed_model(small_checkpoint, "blocked"), jnp.asarray(PROMPTS)))
    mesh = make_mesh({"data": 1, "tensor": 2, "expert": 2}, small_config(), jax.devices()[:4], packed_experts=True)
    sharded = packed_model(small_checkpoint, "tpu_kernel", mesh)
    with jax.set_mesh(mesh):
        got = np.asarray(forward(sharded, put(PROMPTS.astype(np.int32), NamedSharding(mesh, PartitionSpec("data")))))
    scale = np.abs(unsharded_logits).max()
    np.testing.assert_allclose(got, unsharded_logits, rtol=0, atol=1e-5 * scale)


def packed_weight_copies(hlo: str) -> list[str]:
    """The copies of packed expert weights (parameters `*_blocks`, `*_scales`) in an optimized TPU program:
    into another layout (`copy`) or whole into VMEM (`copy-start`). Scales of one group a shard are left out:
    a degenerate shape that XLA relayouts (256 bytes here)."""
    weights = {m[1] for m in re.finditer(r"= (u8\[[0-9,]+\])\{[^}]*\} parameter\(.*_(blocks|scales)\b", hlo)}
    copies = [m[1] for m in re.finditer(r"= \(?(u8\[[0-9,]+\])\{[^}]*\}.*? copy(-start)?\(", hlo)]
    return [shape for shape in copies if shape in weights and not shape.endswith(",1]")]


NEEDS_LIBTPU = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="needs libtpu: pip install -e '.[tpu]'")  # fmt: skip


@NEEDS_LIBTPU
@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1", "tpu7x:2x2x1"])
def test_packed_kernel_compiles_for_each_tpu_generation(topology):
    """The packed kernel alone, 12 blocks of 16 rows over 4 experts, compiled for one device of each generation
    other than v6e (which the whole job's compile below covers), with the scales in the layout the model places
    them in: Mosaic accepts its blocks and tiles on every chip (a few seconds each)."""
    device = tpu_compile.load_topology(topology).devices[0]

    def abstract(shape, dtype, layout=None):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=Format(layout, SingleDeviceSharding(device)))

    groups = FAN_IN // mxfp4.VALUES_PER_BLOCK
    codes = abstract((EXPERTS, FAN_OUT, groups, 16), jnp.uint8)
    scales = abstract((EXPERTS, FAN_OUT, groups), jnp.uint8, Layout(SCALES_MAJOR_TO_MINOR))
    blocks, rows = 12, 16
    x, bias = abstract((blocks * rows, FAN_IN), jnp.bfloat16), abstract((EXPERTS, FAN_OUT), jnp.bfloat16)
    kernel = jax.jit(functools.partial(grouped_matmul, block_rows=rows, tile_out=TILE_OUT))
    compiled = kernel.lower(x, mxfp4.PackedMatrices(codes, scales), bias, abstract((blocks,), jnp.int32)).compile()
    assert KERNEL_NAME in compiled.as_text()


@NEEDS_LIBTPU
def test_packed_decode_and_prefill_compile_with_the_kernel_reading_the_weights_in_place():
    """The job's decode and prefill calls with packed experts, compiled for v6e:2x2 (mesh: 2 tensor
    shards x 2 expert shards), run the experts in the Mosaic kernel and fit, and the packed weights reach it
    as they are placed (scales: `tpu_grouped_matmul.SCALES_MAJOR_TO_MINOR`), in HBM: not copied, so that the
    kernel reads only the used experts' tiles. One topology, for the suite's time (about a minute each); BENCHMARKS.md has the other generations."""
    config = small_settings((1, 2, 2))
    config.packed_experts = True
    engine = tpu_compile.abstract_engine(config, tpu_compile.load_topology("v6e:2x2"))
    for name, lower in tpu_compile.job_programs(engine, all_buckets=False).items():
        hlo = lower().compile().as_text()
        assert KERNEL_NAME in hlo, f"{name}: no expert kernel in the compiled program"
        assert not packed_weight_copies(hlo), f"{name}: packed expert weights copied before the kernel"
