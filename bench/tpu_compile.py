"""Per-chip memory of the engine's prefill and decode calls, compiled for a TPU topology on this machine.

    pip install 'jax[tpu]==0.10.2'       # libtpu: the real TPU compiler, no TPU needed
    python bench/tpu_compile.py --config=configs/gpt_oss_20b.py --topology=v6e:2x4 --mesh=1,8,1 \
        --max_slots=8 --max_len=131072 --prefill_tokens=8192

The model is abstract (shapes, dtypes and shardings only) and so are the cache and the inputs: nothing is
allocated. XLA's `memory_analysis()` gives, per chip, the bytes of the arguments (weights, cache), outputs,
aliases (the donated cache) and temporaries; a program that does not fit fails to compile with
RESOURCE_EXHAUSTED, which is reported as such. Prints one JSON line per program.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiling needs no TPU backend

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from common import load_settings  # noqa: E402
from gptoss_dist import settings as run_settings  # noqa: E402
from gptoss_dist.checkpoint import abstract_model  # noqa: E402
from gptoss_dist.engine import Engine  # noqa: E402
from gptoss_dist.sharding import MESH_AXES, make_mesh, param_shardings  # noqa: E402

GiB = 1 << 30


def sharded_abstract_model(cfg, mesh, dtype, packed_experts: bool):
    """The model with every weight a ShapeDtypeStruct in its sharding on `mesh`."""
    graphdef, state = nnx.split(abstract_model(cfg, dtype=dtype, packed_experts=packed_experts))
    shardings = param_shardings(state, mesh)
    state = jax.tree.map(
        lambda var, sharding: var.replace(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sharding)),
        state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable),
    )  # fmt: skip
    return nnx.merge(graphdef, state)


def measure(name: str, lower) -> dict:
    start = time.perf_counter()
    try:
        compiled = lower().compile()
    except Exception as err:  # XLA's out-of-memory is an XlaRuntimeError with RESOURCE_EXHAUSTED in its text
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        return {"program": name, "fits": False, "error": str(err).splitlines()[0][:300]}
    memory = compiled.memory_analysis()
    figures = {
        "argument_gib": memory.argument_size_in_bytes / GiB,
        "output_gib": memory.output_size_in_bytes / GiB,
        "alias_gib": memory.alias_size_in_bytes / GiB,
        "temp_gib": memory.temp_size_in_bytes / GiB,
    }
    total = figures["argument_gib"] + figures["output_gib"] - figures["alias_gib"] + figures["temp_gib"]
    return {"program": name, "fits": True, **{k: round(v, 3) for k, v in figures.items()},
            "total_gib": round(total, 3), "compile_s": round(time.perf_counter() - start, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/gpt_oss_20b.py")
    parser.add_argument("--topology", default="v6e:2x4")
    parser.add_argument("--mesh", default="1,8,1", help="data,tensor,expert")
    parser.add_argument("--max_slots", type=int, default=8)
    parser.add_argument("--max_len", type=int, default=131072)
    parser.add_argument("--prefill_tokens", type=int, default=8192)
    parser.add_argument("--programs", default="prefill,decode")
    parser.add_argument("--packed_experts", action="store_true")
    args = parser.parse_args()

    settings = load_settings(args.config)
    cfg = run_settings.model_config(settings)
    devices = topologies.get_topology_desc(platform="tpu", topology_name=args.topology).devices
    sizes = dict(zip(MESH_AXES, map(int, args.mesh.split(","))))
    mesh = make_mesh(sizes, cfg, devices[: math.prod(sizes.values())], packed_experts=args.packed_experts)
    model = sharded_abstract_model(cfg, mesh, jnp.bfloat16, args.packed_experts)
    engine = Engine(model, mesh, max_slots=args.max_slots, max_len=args.max_len, prefill_tokens=args.prefill_tokens,
                    steps_per_call=settings.steps_per_call)  # fmt: skip
    rows, width = engine.row_buckets[0], engine.length_buckets[-1]  # the calls a long prompt's pieces take
    programs = {
        "prefill": (f"prefill {rows}x{width}", lambda: engine.lower_prefill(rows, width)),
        "decode": (f"decode {settings.steps_per_call} steps", engine.lower_decode),
    }
    setting = {"topology": args.topology, "device": devices[0].device_kind, "mesh": args.mesh,
               "max_slots": args.max_slots, "max_len": args.max_len, "packed_experts": args.packed_experts}  # fmt: skip
    for key in args.programs.split(","):
        name, lower = programs[key]
        print(json.dumps(setting | measure(name, lower)), flush=True)


if __name__ == "__main__":
    main()
