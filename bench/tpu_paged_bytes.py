"""Bytes of keys and values a decode step reads on TPUs, by construction (no TPU is timed): the paged kernel
(`gptoss_dist.tpu_paged_attention`) against the portable blockwise path, at the paged cache issue's realistic
lengths, and the time those bytes take at each chip's HBM bandwidth.

    python bench/tpu_paged_bytes.py

Each of B sequences has a prompt of 128-2,048 tokens and an output of 1-2,048, and is caught at a uniformly
random point of its output (`max_len` 8,192); the figures are means over --snapshots such batches. Per
full-attention layer and step, the kernel reads each sequence's live keys in pieces of `block_size(page, 512)`
positions (pages of --page_size); the portable path reads every sequence up to the batch's longest, in blocks
of 512. The sliding layers read their 128-position window either way and are left out. Keys and values are
bf16, the 20B's 8 KV heads of 64 (the 120B's are the same). Times are for the whole model's full-attention
layers on one chip holding 1/8 of the KV heads (`mesh.tensor` = 8).
"""

from __future__ import annotations

import argparse
import math
import runpy
from pathlib import Path

import numpy as np
from common import HBM_BYTES_PER_S

from gptoss_dist.attention import DEFAULT_BLOCK
from gptoss_dist.settings import model_config
from gptoss_dist.tpu_paged_attention import block_size

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"20B": "gpt_oss_20b.py", "120B": "gpt_oss_120b.py"}
BF16 = 2
TENSOR = 8


def live_lengths(rng: np.random.Generator, batch: int) -> np.ndarray:
    prompts = rng.integers(128, 2049, batch)
    generated = rng.integers(0, rng.integers(1, 2049, batch) + 1)
    return prompts + generated


def rows(args) -> list[str]:
    header = ("| model | sequences | mean live tokens | longest | kernel | portable | portable / kernel | kernel step "
              "at v5e / v6e / v5p | portable step at v5e / v6e / v5p |")  # fmt: skip
    lines = [header, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    piece = block_size(args.page_size, DEFAULT_BLOCK)
    rng = np.random.default_rng(0)
    for name, file in MODELS.items():
        cfg = model_config(runpy.run_path(str(ROOT / "configs" / file))["get_config"]())
        full_layers = sum(cfg.window(layer) is None for layer in range(cfg.num_layers))
        per_position = full_layers * cfg.num_kv_heads * 2 * cfg.head_dim * BF16
        for batch in (1, 64, 256):
            batches = [live_lengths(rng, batch) for _ in range(args.snapshots)]
            kernel = np.mean([np.sum(-(-lengths // piece) * piece) for lengths in batches]) * per_position
            portable = np.mean([batch * math.ceil(lengths.max() / DEFAULT_BLOCK) * DEFAULT_BLOCK for lengths in batches])
            portable *= per_position
            times = [" / ".join(f"{b / TENSOR / rate * 1e6:,.0f}" for rate in HBM_BYTES_PER_S.values())
                     for b in (kernel, portable)]  # fmt: skip
            mean = np.mean([lengths.mean() for lengths in batches])
            longest = np.mean([lengths.max() for lengths in batches])
            lines.append(f"| {name} | {batch} | {mean:,.0f} | {longest:,.0f} | {kernel / 1e9:.2f} GB | "
                         f"{portable / 1e9:.2f} GB | {portable / kernel:.2f} | {times[0]} us | {times[1]} us |")  # fmt: skip
    return lines


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--page_size", type=int, default=64)
    parser.add_argument("--snapshots", type=int, default=100)
    print("\n".join(rows(parser.parse_args())))
