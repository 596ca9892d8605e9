"""Forward-pass throughput of one config on 1 and on 8 (simulated) devices, over several meshes.

    python bench/sharding.py --config=configs/mid.py --batch=8 --length=128

Each device count runs in its own process (JAX fixes the CPU device count at start). On a CPU the 8
"devices" share the host's cores, so this measures the cost of the sharded program (collectives,
partitioning), not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys

MESHES = {1: [(1, 1, 1)], 8: [(8, 1, 1), (2, 2, 2), (1, 2, 4), (1, 8, 1)]}


def measure(config: str, devices: int, batch: int, length: int) -> list[dict]:
    import jax

    jax.config.update("jax_num_cpu_devices", devices)
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from common import best_time, load_settings, machine
    from gptoss_dist import settings as run_settings
    from gptoss_dist.model import random_model
    from gptoss_dist.sharding import MESH_AXES, make_mesh, put

    settings = load_settings(config)
    cfg = run_settings.model_config(settings)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, length)).astype(np.int32)
    rows = []
    for shape in MESHES[devices]:
        mesh = make_mesh(dict(zip(MESH_AXES, shape)), cfg, jax.devices()[: math.prod(shape)])
        model = random_model(cfg, dtype=run_settings.dtype(settings), mesh=mesh)
        graphdef, state = nnx.split(model)
        forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
        with jax.set_mesh(mesh):
            placed = put(tokens, NamedSharding(mesh, PartitionSpec("data")))
            seconds = best_time(lambda: forward(state, placed))
        rows.append({"mesh": shape, "seconds": seconds, "tokens_per_s": batch * length / seconds,
                     "machine": machine(), "dtype": str(jnp.dtype(run_settings.dtype(settings)))})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mid.py")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--devices", type=int, help=argparse.SUPPRESS)  # set in the child processes
    args = parser.parse_args()
    if args.devices:
        print(json.dumps(measure(args.config, args.devices, args.batch, args.length)))
        return
    rows = []
    for devices in MESHES:
        command = [sys.executable, __file__, f"--config={args.config}", f"--batch={args.batch}",
                   f"--length={args.length}", f"--devices={devices}"]  # fmt: skip
        out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
        rows += json.loads(out.strip().splitlines()[-1])
    print(f"{args.config}, batch {args.batch} x {args.length} tokens, {rows[0]['dtype']}, on {rows[0]['machine']}")
    print("| mesh (data, tensor, expert) | forward time | tokens/s |")
    print("| --- | --- | --- |")
    for row in rows:
        print(f"| {tuple(row['mesh'])} | {row['seconds'] * 1e3:.1f} ms | {row['tokens_per_s']:,.0f} |")


if __name__ == "__main__":
    main()
