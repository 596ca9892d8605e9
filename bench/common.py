"""Helpers shared by the benchmarks: loading a config file, timing, the machine's description, random MXFP4
codes."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

import jax
import numpy as np

from gptoss_dist import mxfp4

HBM_BYTES_PER_S = {"v5e": 819e9, "v6e": 1640e9, "v5p": 2765e9}  # a chip's HBM bandwidth, Cloud TPU documentation


def load_settings(path: str, overrides: dict | None = None):
    """A config file's settings (configs/*.py), with dotted overrides such as {"mesh.expert": 4}."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    settings = module.get_config()
    for key, value in (overrides or {}).items():
        *parents, leaf = key.split(".")
        node = settings
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return settings


def run_times(run: Callable[[], object], repeats: int) -> list[float]:
    """The seconds of `repeats` runs (until their results are ready), after one warm-up run (which compiles)."""
    jax.block_until_ready(run())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return times


def best_time(run: Callable[[], object], repeats: int = 3) -> float:
    """The fastest of `repeats` runs, in seconds, after one warm-up run (which compiles)."""
    return min(run_times(run, repeats))


def machine() -> str:
    device = jax.devices()[0]
    kind = device.device_kind if device.platform != "cpu" else platform.processor() or platform.machine()
    return f"{device.platform} ({kind}), {os.cpu_count()} host cores, jax {jax.__version__}"


def random_mxfp4(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Random MXFP4 codes of `values`' shape. Encoding a 20B expert weight for real holds 16 float32 copies
    of it (34 GB) and takes about 5 s per expert; converting and loading cost the same whatever the codes."""
    rng = np.random.default_rng(0)
    groups = (*values.shape[:-1], values.shape[-1] // mxfp4.VALUES_PER_BLOCK)
    blocks = rng.integers(0, 256, (*groups, mxfp4.VALUES_PER_BLOCK // 2), dtype=np.uint8)
    return blocks, rng.integers(mxfp4.SCALE_BIAS - 8, mxfp4.SCALE_BIAS - 2, groups, dtype=np.uint8)
