"""Starting JAX across processes: on a TPU pod with no arguments, elsewhere from the settings or the
environment that `launch/local.py` (or any launcher) sets.

Environment (each overrides the matching `distributed.*` setting):
    GPTOSS_COORDINATOR     host:port of process 0's coordinator service
    GPTOSS_NUM_PROCESSES   how many processes run the job
    GPTOSS_PROCESS_ID      this process's index, 0..N-1
    GPTOSS_CPU_DEVICES     CPU devices this process simulates (tests and the local demo)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax

ENV = {
    "coordinator": "GPTOSS_COORDINATOR",
    "num_processes": "GPTOSS_NUM_PROCESSES",
    "process_id": "GPTOSS_PROCESS_ID",
    "cpu_devices": "GPTOSS_CPU_DEVICES",
}


def resolve(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The distributed settings, each overridden by its environment variable where that is set."""
    resolved = dict(settings)
    for key, variable in ENV.items():
        if os.environ.get(variable):
            resolved[key] = os.environ[variable] if key == "coordinator" else int(os.environ[variable])
    return resolved


def initialize(settings: Mapping[str, Any]) -> None:
    """Connects this process to the others; call before anything touches `jax.devices()`.

    `settings` holds `coordinator`, `num_processes`, `process_id`, `cpu_devices`, `timeout_s` (how long to
    wait for every process to join) and `tpu_pod` (with no explicit processes: let JAX find the pod's hosts).
    """
    config = resolve(settings)
    if config.get("cpu_devices"):
        jax.config.update("jax_num_cpu_devices", int(config["cpu_devices"]))
    if int(config.get("num_processes") or 1) > 1:
        if not config.get("coordinator"):
            raise ValueError(f"{config['num_processes']} processes need a coordinator (set {ENV['coordinator']})")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # used only where devices are CPUs
        jax.distributed.initialize(
            coordinator_address=config["coordinator"],
            num_processes=int(config["num_processes"]),
            process_id=int(config["process_id"]),
            initialization_timeout=int(config.get("timeout_s") or 300),
        )
    elif config.get("tpu_pod"):
        jax.distributed.initialize()


def is_writer() -> bool:
    """Whether this process writes the job's records (exactly one process does)."""
    return jax.process_index() == 0
