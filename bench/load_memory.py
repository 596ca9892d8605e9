"""Peak host memory while `from_pretrained` loads a Hugging Face directory with MXFP4 experts.

    python bench/load_memory.py --experts=128 --against=/tmp/gptoss-before

Writes a random checkpoint in the published layout (MXFP4 experts, random codes: `common.random_mxfp4`) of
one GPT-OSS-120B-shaped layer (hidden 2880, intermediate 2880, --experts experts, the full vocabulary), in a
process of its own, then loads it in bfloat16 onto one device in
a fresh process per code tree: this checkout and, with --against, another checkout of the package (say an
earlier commit, unpacked with `git archive`), so that both run on the same checkpoint in the same run. On the
CPU the device memory is the process's own, so each child reports its peak RSS (`resource.getrusage`) before
and after loading, the parameters' bytes, and the peak beyond them: what loading needed on top of the model.
This process imports neither JAX nor numpy, so that the children's peaks are theirs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(checkpoint: str) -> dict:
    """One load, in this (fresh) process."""
    import time

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from common import machine
    from gptoss_dist import from_pretrained

    jax.block_until_ready(jnp.zeros(1))  # the runtime started: the baseline
    started = peak_rss()
    start = time.perf_counter()
    model = from_pretrained(checkpoint, dtype=jnp.bfloat16)
    load_s = time.perf_counter() - start
    param_bytes = sum(var.get_value().nbytes for _, var in nnx.to_flat_state(nnx.state(model)))
    loaded = peak_rss()
    return {"machine": machine(), "load_s": load_s, "param_bytes": param_bytes, "rss_started": started,
            "rss_loaded": loaded, "beyond_params": loaded - started - param_bytes}  # fmt: skip


def write_here(directory: str, experts: int) -> None:
    """The checkpoint, written in this (fresh) process."""
    from unittest import mock

    from common import load_settings, random_mxfp4
    from gptoss_dist import mxfp4
    from gptoss_dist.random_checkpoint import write_random_checkpoint
    from gptoss_dist.settings import model_config

    overrides = {"model.num_layers": 1, "model.layer_types": ("sliding_attention",), "model.num_experts": experts}
    cfg = model_config(load_settings(str(ROOT / "configs" / "gpt_oss_120b.py"), overrides))
    with mock.patch.object(mxfp4, "encode_np", random_mxfp4):
        write_random_checkpoint(directory, cfg)


def write_checkpoint(directory: Path, experts: int) -> None:
    env = os.environ | {"PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'bench'}", "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, __file__, f"--write={directory}", f"--experts={experts}"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)


def load_with(code: Path, checkpoint: Path) -> dict:
    """A child that loads the checkpoint with the package found in `code`."""
    env = os.environ | {"PYTHONPATH": f"{code}{os.pathsep}{ROOT / 'bench'}", "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, __file__, f"--checkpoint={checkpoint}"]
    out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--against", help="another checkout of the package to load the same checkpoint with")
    parser.add_argument("--workdir", default=None, help="where the checkpoint goes (default: the system temp dir)")
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)  # set in the child processes
    parser.add_argument("--write", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        write_here(args.write, args.experts)
        return
    if args.checkpoint:
        print(json.dumps(measure(args.checkpoint)))
        return
    trees = {"this checkout": ROOT} | ({f"--against {args.against}": Path(args.against)} if args.against else {})
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        checkpoint = Path(work) / "hf"
        write_checkpoint(checkpoint, args.experts)
        rows = {name: load_with(code, checkpoint) for name, code in trees.items()}
    gb = 1e9
    print(f"one 120B-shaped layer, {args.experts} MXFP4 experts, bfloat16, on {next(iter(rows.values()))['machine']}")
    print("| code | params GB | peak RSS started GB | peak RSS loaded GB | loaded beyond params GB | load s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, row in rows.items():
        print(f"| {name} | {row['param_bytes'] / gb:.2f} | {row['rss_started'] / gb:.2f} | {row['rss_loaded'] / gb:.2f} "
              f"| {row['beyond_params'] / gb:.2f} | {row['load_s']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
