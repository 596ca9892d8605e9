"""Helpers shared by the benchmarks: loading a config file, timing, and the machine's description."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

import jax


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
