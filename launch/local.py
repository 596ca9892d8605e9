#!/usr/bin/env python3
"""Runs a command as P cooperating JAX processes on this machine, each simulating N CPU devices.

    python launch/local.py --processes=2 --devices=4 -- python -m gptoss_dist.generate --config=configs/tiny.py ...

Each process gets GPTOSS_COORDINATOR, GPTOSS_NUM_PROCESSES, GPTOSS_PROCESS_ID and GPTOSS_CPU_DEVICES (see
gptoss_dist/distributed.py); its output lines are prefixed with [process i]. SIGINT and SIGTERM are passed
on to every process. When one process fails, the others are stopped (SIGTERM, then SIGKILL after
--grace_s) and the launcher exits with that process's status, so a dead peer never leaves the rest hanging.
A status that the job ends with by itself (gptoss_dist.exit_codes: some requests failed, or it cannot start)
is not a failure while every process ends so within --grace_s: the launcher says what it means and exits
with it.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from gptoss_dist.exit_codes import EXIT_CANNOT_START, EXIT_FAILED_REQUESTS, EXIT_PEER_LOST

# Statuses every process of the job ends with together, by itself, and what they mean.
JOB_ENDINGS = {
    EXIT_FAILED_REQUESTS: "the job ran to its end, and some requests failed: its summary and errors say which",
    EXIT_CANNOT_START: "the job could not start: its error says why",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def relay(process: subprocess.Popen, prefix: str) -> None:
    for line in process.stdout:
        sys.stdout.write(f"{prefix} {line}")
        sys.stdout.flush()


def start(command: list[str], processes: int, devices: int) -> tuple[list[subprocess.Popen], list[threading.Thread]]:
    coordinator = f"127.0.0.1:{free_port()}"
    children, relays = [], []
    for index in range(processes):
        env = os.environ | {
            "GPTOSS_COORDINATOR": coordinator,
            "GPTOSS_NUM_PROCESSES": str(processes),
            "GPTOSS_PROCESS_ID": str(index),
            "GPTOSS_CPU_DEVICES": str(devices),
            "PYTHONUNBUFFERED": "1",
        }
        child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        relays.append(threading.Thread(target=relay, args=(child, f"[process {index}]"), daemon=True))
        relays[-1].start()
        children.append(child)
    return children, relays


def stop(children: list[subprocess.Popen], grace_s: float) -> None:
    for child in children:
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + grace_s
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def all_end_with(children: list[subprocess.Popen], status: int, grace_s: float) -> bool:
    """Whether every process ends with `status` by itself within `grace_s`."""
    deadline = time.monotonic() + grace_s
    while any(child.poll() is None for child in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    return all(child.poll() == status for child in children)


def supervise(children: list[subprocess.Popen], grace_s: float) -> int:
    """Waits for every process; on the first failure stops the rest. Returns the exit status."""
    while True:
        statuses = [child.poll() for child in children]
        # a process that stopped because another died (EXIT_PEER_LOST) is not the one to name
        failed = sorted(
            ((i, s) for i, s in enumerate(statuses) if s not in (None, 0)), key=lambda f: f[1] == EXIT_PEER_LOST
        )
        if failed:
            index, status = failed[0]
            if status in JOB_ENDINGS and all_end_with(children, status, grace_s):
                print(f"[launch] every process exited with status {status}: {JOB_ENDINGS[status]}", file=sys.stderr)
                return status
            print(f"[launch] process {index} exited with status {status}; stopping the others", file=sys.stderr)
            stop(children, grace_s)
            return status if status > 0 else 128 - status
        if all(s == 0 for s in statuses):
            return 0
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices", type=int, default=4, help="CPU devices per process")
    parser.add_argument("--grace_s", type=float, default=10.0, help="wait this long after SIGTERM before SIGKILL")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command each process runs")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    children, relays = start(command, args.processes, args.devices)

    def forward(signum, _frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    status = supervise(children, args.grace_s)
    for thread in relays:  # the last lines of output
        thread.join(timeout=5)
    sys.exit(status)


if __name__ == "__main__":
    main()
