"""Peak host memory of a model whose experts stay packed (MXFP4) against one whose experts are dequantized.

    python bench/packed_memory.py --config=configs/mid.py --workdir=/tmp

Writes a random checkpoint of the config in the published layout (MXFP4 experts), then, for each mode, runs a
fresh process that loads it (`from_pretrained`, bfloat16 parameters and compute, experts dequantized or kept
packed) and generates with the engine, twice (the first run compiles): --batch prompts of --prompt tokens,
--new greedy tokens each. On the
CPU the device memory is the process's own, so each process reports its parameters' bytes and its peak RSS
(`resource.getrusage`) after starting JAX, after loading and after generating. This process imports neither
JAX nor numpy, so that the children's peaks, which count what a child inherits before it execs, are theirs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = ("dense", "packed")
EXPERT_PARAMS = {"gate_up", "down", "gate_up_blocks", "gate_up_scales", "down_blocks", "down_scales"}


def peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(checkpoint: str, mode: str, batch: int, prompt: int, new: int) -> dict:
    """One mode, in this (fresh) process."""
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from common import machine
    from gptoss_dist import from_pretrained
    from gptoss_dist.engine import Engine, Request

    jax.block_until_ready(jnp.zeros(1))  # the runtime started: the baseline
    started = peak_rss()
    start = time.perf_counter()
    model = from_pretrained(checkpoint, dtype=jnp.bfloat16, packed_experts=mode == "packed")
    load_s = time.perf_counter() - start
    params = [(path[-1], var.get_value().nbytes) for path, var in nnx.to_flat_state(nnx.state(model))]
    loaded = peak_rss()
    engine = Engine(model, max_slots=batch, max_len=prompt + new, stop_tokens=())
    rng = np.random.default_rng(0)
    requests = [Request(rng.integers(0, model.config.vocab_size, prompt).tolist(), max_new_tokens=new)
                for _ in range(batch)]  # fmt: skip
    start = time.perf_counter()
    tokens = [result.tokens for result in engine.generate(requests)]
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    engine.generate(requests)
    return {
        "mode": mode, "machine": machine(), "load_s": load_s, "first_generate_s": first_s,
        "generate_s": time.perf_counter() - start,
        "expert_bytes": sum(n for name, n in params if name in EXPERT_PARAMS),
        "param_bytes": sum(n for _, n in params), "rss_started": started, "rss_loaded": loaded,
        "rss_generated": peak_rss(), "tokens": tokens,
    }  # fmt: skip


def write_checkpoint(config: str, directory: Path) -> None:
    command = [sys.executable, "-m", "gptoss_dist.random_checkpoint", f"--config={config}", f"--out={directory}"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def run_mode(args: argparse.Namespace, checkpoint: Path, mode: str) -> dict:
    command = [sys.executable, __file__, f"--checkpoint={checkpoint}", f"--mode={mode}", f"--batch={args.batch}",
               f"--prompt={args.prompt}", f"--new={args.new}"]  # fmt: skip
    out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def report(config: str, args: argparse.Namespace, rows: list[dict]) -> None:
    mb = 1e6
    print(f"{config}, bfloat16, {args.batch} prompts x {args.prompt} tokens + {args.new} new, on {rows[0]['machine']}")
    print("| experts | expert params MB | all params MB | peak RSS started MB | peak RSS loaded MB "
          "| peak RSS generated MB | load s | first generate s | generate s |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['mode']} | {row['expert_bytes'] / mb:,.1f} | {row['param_bytes'] / mb:,.1f} "
              f"| {row['rss_started'] / mb:,.0f} | {row['rss_loaded'] / mb:,.0f} | {row['rss_generated'] / mb:,.0f} "
              f"| {row['load_s']:.1f} | {row['first_generate_s']:.1f} | {row['generate_s']:.1f} |")  # fmt: skip
    pairs = list(zip(rows[0]["tokens"], rows[1]["tokens"], strict=True))
    same_tokens = sum(a == b for dense, packed in pairs for a, b in zip(dense, packed))
    print(
        f"greedy sequences identical, packed vs dense: {sum(a == b for a, b in pairs)} of {len(pairs)}; "
        f"tokens equal position by position: {same_tokens} of {sum(map(len, rows[0]['tokens']))}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mid.py")
    parser.add_argument("--workdir", default=None, help="where the checkpoint goes (default: the system temp dir)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=16)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)  # set in the child processes
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.checkpoint, args.mode, args.batch, args.prompt, args.new)))
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        checkpoint = Path(work) / "hf"
        write_checkpoint(args.config, checkpoint)
        rows = [run_mode(args, checkpoint, mode) for mode in MODES]
    report(args.config, args, rows)


if __name__ == "__main__":
    main()
