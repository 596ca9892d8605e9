"""One expert matmul as a TPU chip runs it, compiled deviceless (libtpu, no TPU): XLA's `ragged_dot` on dense
bf16 weights against the TPU kernel (`gptoss_dist.tpu_grouped_matmul`) on dense and packed weights.

    python bench/tpu_experts_compile.py --topology=v6e:2x2 --rows=64,4096

The shape is one chip's share of a 20B layer's gate_up on mesh (1, 2, 4): 8 experts, 2880 inputs, 2880
outputs; rows routed at random; packed scales in the layout the model places them in on a TPU
(`tpu_grouped_matmul.SCALES_MAJOR_TO_MINOR`). Prints, per variant, the compile time, XLA's temporaries,
XLA's "bytes accessed" (it does not count inside a Pallas kernel) and the Mosaic kernels in the compiled
program.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.experimental.layout import Format, Layout

from gptoss_dist import mxfp4
from gptoss_dist.model import row_blocks
from gptoss_dist.tpu_grouped_matmul import SCALES_MAJOR_TO_MINOR, grouped_matmul

EXPERTS, FAN_IN, FAN_OUT = 8, 2880, 2880


def ragged(x, weights, bias, group):
    sizes = jnp.bincount(group, length=EXPERTS).astype(jnp.int32)
    return jax.lax.ragged_dot(x, weights, sizes) + bias[group]


def kernel(x, weights, bias, group):
    blocks = row_blocks(group, jnp.bincount(group, length=EXPERTS).astype(jnp.int32), EXPERTS, smallest=16)
    return blocks.unpad(grouped_matmul(blocks.pad(x), weights, bias, blocks.expert, blocks.size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v6e:2x2")
    parser.add_argument("--rows", default="64,4096")
    args = parser.parse_args()
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    device = topologies.get_topology_desc(platform="tpu", topology_name=args.topology).devices[0]
    sharding = jax.sharding.SingleDeviceSharding(device)

    def abstract(shape, dtype, layout=None):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=Format(layout, sharding))

    dense = abstract((EXPERTS, FAN_IN, FAN_OUT), jnp.bfloat16)
    groups = FAN_IN // mxfp4.VALUES_PER_BLOCK
    scales = abstract((EXPERTS, FAN_OUT, groups), jnp.uint8, Layout(SCALES_MAJOR_TO_MINOR))
    packed = mxfp4.PackedMatrices(abstract((EXPERTS, FAN_OUT, groups, 16), jnp.uint8), scales)
    bias = abstract((EXPERTS, FAN_OUT), jnp.bfloat16)
    print("| rows | variant | compile | temporaries | XLA bytes accessed | Mosaic kernels |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for rows in map(int, args.rows.split(",")):
        x, group = abstract((rows, FAN_IN), jnp.bfloat16), abstract((rows,), jnp.int32)
        for name, function, weights in (("ragged_dot, dense", ragged, dense), ("kernel, dense", kernel, dense),
                                        ("kernel, packed", kernel, packed)):  # fmt: skip
            start = time.perf_counter()
            compiled = jax.jit(function).lower(x, weights, bias, group).compile()
            seconds = time.perf_counter() - start
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            temporaries = compiled.memory_analysis().temp_size_in_bytes
            print(f"| {rows} | {name} | {seconds:.1f} s | {temporaries / 2**20:.2f} MiB | "
                  f"{cost.get('bytes accessed', 0) / 1e6:.1f} MB | {compiled.as_text().count('tpu_custom_call')} |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
