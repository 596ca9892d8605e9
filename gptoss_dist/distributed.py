"""Starting JAX across processes: on a TPU pod with no arguments, elsewhere from the settings or the
environment that `launch/local.py` (or any launcher) sets; and watching that the other processes live.

Environment (each overrides the matching `distributed.*` setting):
    GPTOSS_COORDINATOR     host:port of process 0's coordinator service
    GPTOSS_NUM_PROCESSES   how many processes run the job
    GPTOSS_PROCESS_ID      this process's index, 0..N-1
    GPTOSS_CPU_DEVICES     CPU devices this process simulates (tests and the local demo)
"""

from __future__ import annotations

import atexit
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
from jax._src import distributed as jax_distributed  # the coordination service's client (its key-value store)

from gptoss_dist.settings import SettingsError

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


HEARTBEAT_PREFIX = "gptoss/heartbeat/"
DONE = "done"


class PeerWatch:
    """Notices a process of the job that has died (or hangs) within `timeout_s`, rather than JAX's collectives
    hanging on it until the coordination service gives up on it.

    Every `interval_s` each process bumps its count in the coordination service's key-value store and reads the
    others'. A process whose count has not moved for `timeout_s` is lost: `on_lost` is called with a line naming
    it and its host. A process that ends by itself says so first (`stop`), and is not watched from then on. If
    this thread itself was held up, it waits another `timeout_s` before judging. (Process 0 holds the service:
    when it dies, JAX stops the others at once.)"""

    def __init__(self, client, timeout_s: float, on_lost: Callable[[str], None], interval_s: float = 1.0):
        self.client, self.timeout_s, self.on_lost, self.interval_s = client, timeout_s, on_lost, interval_s
        self.me, self.count = jax.process_index(), jax.process_count()
        self.host = socket.gethostname()
        self.seen: dict[int, tuple[str | None, float]] = {}  # process -> (its count, when it last changed)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="gptoss-peer-watch", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Ends the watch, telling the others this process ends by itself."""
        self.stopped.set()
        self.thread.join()
        self.client.key_value_set(f"{HEARTBEAT_PREFIX}{self.me}", DONE, allow_overwrite=True)

    def _run(self) -> None:
        beat, last = 0, time.monotonic()
        while not self.stopped.wait(self.interval_s):
            now = time.monotonic()
            if now - last > 2 * self.interval_s:  # this thread was held up: what it saw is stale
                self.seen.clear()
            last, beat = now, beat + 1
            self.client.key_value_set(f"{HEARTBEAT_PREFIX}{self.me}", f"{beat} {self.host}", allow_overwrite=True)
            lost = self._lost(dict(self.client.key_value_dir_get(HEARTBEAT_PREFIX)), now)
            if lost is not None:
                self.on_lost(lost)
                return

    def _lost(self, values: dict[str, str], now: float) -> str | None:
        """A line naming a process whose count has not moved for `timeout_s` (or that never counted), or None."""
        for process in range(self.count):
            value = values.get(f"{HEARTBEAT_PREFIX}{process}")
            if process == self.me or value == DONE:
                continue
            previous, since = self.seen.get(process, (value, now))
            self.seen[process] = (value, since if value == previous else now)
            if now - self.seen[process][1] > self.timeout_s:
                host = f" (host {value.split(' ', 1)[1]})" if value else ""
                return (f"process {process} of {self.count}{host} has not answered for {self.timeout_s:.0f} s: "
                        "it died or hangs, its output says why")  # fmt: skip
        return None


def watch_peers(timeout_s: float, on_lost: Callable[[str], None]) -> PeerWatch | None:
    """Watches the other processes of a multi-process job (None for one process); the watch ends, telling the
    others, when this process exits. SettingsError for a timeout that is not positive."""
    if not timeout_s > 0:
        raise SettingsError(f"distributed.peer_timeout_s must be > 0, not {timeout_s}")
    if jax.process_count() == 1:
        return None
    watch = PeerWatch(jax_distributed.global_state.client, timeout_s, on_lost)
    watch.start()
    atexit.register(watch.stop)  # before JAX's shutdown, which registered earlier and so runs later
    return watch
