"""The batch job's test helpers and module fixtures, for any test module that runs jobs (load them with
`pytest_plugins = ["job_fixtures"]`): the tiny config with one set of engine shapes, so that jobs in one
process share their compiled steps; and a random checkpoint and its conversion. Job subprocesses share the
run's persistent compilation cache (conftest).
"""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import pytest

from gptoss_dist import paths, settings
from gptoss_dist.generate import run_job
from gptoss_dist.paths import filesystem
from gptoss_dist.random_checkpoint import write_random_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "tiny.py"
MODEL = settings.model_config(runpy.run_path(str(TINY_CONFIG))["get_config"]())
# Every job's engine shapes; one prefill width (conversations, byte-level behind harmony's system message, take
# about 270 tokens), so that only the three row counts compile.
JOB = {"max_slots": 4, "max_len": 384, "min_prefill_len": 384, "steps_per_call": 4, "sampling.max_new_tokens": 12}


def job_config(checkpoint, input_path, output, **overrides):
    """The tiny config with these paths, JOB and `overrides` (a dotted name sets a nested field)."""
    config = runpy.run_path(str(TINY_CONFIG))["get_config"]()
    paths = {"checkpoint": str(checkpoint), "input": str(input_path), "output": str(output)}
    for name, value in (paths | JOB | overrides).items():
        section, _, field = name.rpartition(".")
        (config[section] if section else config)[field] = value
    return config


def cli(checkpoint, input_path, output, **overrides) -> list[str]:
    """The command line of the same job."""
    settings_ = {"checkpoint": checkpoint, "input": input_path, "output": output} | JOB | overrides
    return [sys.executable, "-m", "gptoss_dist.generate", f"--config={TINY_CONFIG}",
            *(f"--config.{name}={value}" for name, value in settings_.items())]  # fmt: skip


def run(config):
    return run_job(config, devices=jax.devices()[:1])


def write_jsonl(path, lines: list[Any]) -> str:
    """Writes dicts as JSON lines, strings as they are."""
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    filesystem(str(path)).pipe_file(str(path), text.encode())
    return str(path)


def read_output(directory, name) -> list[dict[str, Any]]:
    """The records of `name` in a job's output directory: one file locally, parts elsewhere."""
    if paths.is_local(str(directory)):
        path = Path(directory) / f"{name}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    fs = filesystem(directory)
    fs.invalidate_cache()
    parts = sorted(fs.glob(f"{directory}/{name}-*.jsonl"))
    return [json.loads(line) for part in parts for line in fs.cat_file(part).decode().splitlines()]


def by_id(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    ids = [line["id"] for line in lines]
    assert len(ids) == len(set(ids)), f"duplicated ids: {sorted(i for i in set(ids) if ids.count(i) > 1)}"
    return {line["id"]: line for line in lines}


def by_sample(lines: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """Results by (id, index), each written once."""
    keys = [(line["id"], line["index"]) for line in lines]
    assert len(keys) == len(set(keys)), f"written twice: {sorted(k for k in set(keys) if keys.count(k) > 1)}"
    return dict(zip(keys, lines))


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("generate") / "tiny-hf", MODEL, seed=5)


@pytest.fixture(scope="module")
def converted(hf_checkpoint, tmp_path_factory) -> str:
    from gptoss_dist import convert

    destination = tmp_path_factory.mktemp("generate") / "tiny-converted"
    convert.convert(str(hf_checkpoint), str(destination), dtype="float32", show_progress=False)
    return str(destination)


def run_cli(command: list[str]) -> subprocess.CompletedProcess:
    """Runs a job to its end, in the environment as it is now (the GCS emulator's settings included)."""
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
