"""Conversion throughput and peak memory on checkpoints with GPT-OSS-20B's true layer shapes but few layers.

    python bench/convert.py --layers 2 4 --workdir /tmp --against /tmp/gptoss-before

For each layer count and each expert layout (MXFP4 as openai publishes it, bf16 as transformers saves it),
writes a random checkpoint (`random_checkpoint`), converts it to bf16 in a subprocess
(`python -m gptoss_dist.convert`) with this checkout and, with --against, with another checkout of the
package too (say an earlier commit, unpacked with `git archive`), on the same source in the same run, and
reports source and written MB/s over the converter's whole run (start-up included) and its peak RSS, which
must not grow with the layer count. Files are removed after each run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

from common import machine, random_mxfp4

from gptoss_dist import mxfp4
from gptoss_dist.config import ModelConfig
from gptoss_dist.random_checkpoint import write_random_checkpoint


def make_source(directory: Path, num_layers: int, packed: bool) -> Path:
    full = ModelConfig()
    cfg = dataclasses.replace(full, num_layers=num_layers, layer_types=full.layer_types[:num_layers])
    with mock.patch.object(mxfp4, "encode_np", random_mxfp4):
        return write_random_checkpoint(directory, cfg, packed=packed)


def tree_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def peak_rss_so_far(pid: int) -> int:
    """VmHWM of a running process, in bytes (0 once it has exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:")), 0)


ROOT = Path(__file__).resolve().parents[1]


def run_converter(src: Path, dst: Path, code: Path) -> tuple[float, int]:
    """Seconds and peak RSS (bytes) of one conversion in a subprocess, with the package found in `code`.

    The peak is the converter's own high-water mark, sampled until it exits: its rusage maxrss would also
    count this process's memory, which the child inherits until it execs.
    """
    command = [sys.executable, "-m", "gptoss_dist.convert", f"--src={src}", f"--dst={dst}", "--no-progress"]
    start = time.perf_counter()
    process = subprocess.Popen(command, env=os.environ | {"PYTHONPATH": str(code)})
    peak = 0
    while process.poll() is None:
        peak = max(peak, peak_rss_so_far(process.pid))
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed with exit status {process.returncode}")
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--workdir", default=None, help="where the checkpoints go (default: the system temp dir)")
    parser.add_argument("--against", help="another checkout of the package to convert the same sources with")
    args = parser.parse_args()
    trees = {"this": ROOT} | ({"against": Path(args.against)} if args.against else {})
    print(f"machine: {machine()}; converting to bfloat16; against: {args.against}")
    print(f"{'code':<8} {'experts':<8} {'layers':>6} {'source GB':>9} {'written GB':>10} {'seconds':>8} "
          f"{'source MB/s':>11} {'written MB/s':>12} {'peak RSS GB':>11}")  # fmt: skip
    for packed in (True, False):
        for num_layers in args.layers:
            with tempfile.TemporaryDirectory(dir=args.workdir) as work:
                src = make_source(Path(work) / "hf", num_layers, packed)
                read = tree_bytes(src)
                for name, code in trees.items():
                    dst = Path(work) / f"converted-{name}"
                    seconds, peak_rss = run_converter(src, dst, code)
                    written = tree_bytes(dst)
                    shutil.rmtree(dst)
                    layout = "mxfp4" if packed else "bf16"
                    print(f"{name:<8} {layout:<8} {num_layers:>6} {read / 1e9:>9.2f} {written / 1e9:>10.2f} "
                          f"{seconds:>8.1f} {read / 1e6 / seconds:>11.0f} {written / 1e6 / seconds:>12.0f} "
                          f"{peak_rss / 1e9:>11.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
