"""Multi-host: launch/tpu_pod.sh runs the job on every worker of a (stand-in) TPU VM, 2 processes x 4 CPU
devices, and their output equals the single-process job's record by record; a process that dies stops the
rest in bounded time and a rerun (launch/local.py) finishes exactly once; `plan` matches jax's shard shapes and refuses what cannot
fit before reading any weight."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from jax.sharding import AbstractMesh, NamedSharding

from gptoss_dist import plan
from gptoss_dist.config import FULL, SLIDING, ModelConfig
from gptoss_dist.placements import weight_placements
from gptoss_dist.random_checkpoint import write_random_checkpoint
from gptoss_dist.sharding import MESH_AXES

ROOT = Path(__file__).parents[1]
MESH_FLAGS = ["--config.mesh.data=2", "--config.mesh.tensor=2", "--config.mesh.expert=2"]
# One slot per data shard and one prefill width: one prefill row count, so each process compiles few programs
# (compiling, two processes at once on the CPUs, is most of these jobs' time).
ENGINE_FLAGS = ["--config.max_slots=2", "--config.max_len=128", "--config.min_prefill_len=128"]


def tiny_config():
    import importlib.util

    from gptoss_dist.settings import model_config

    spec = importlib.util.spec_from_file_location("tiny", ROOT / "configs" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return model_config(module.get_config())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    write_random_checkpoint(root / "hf", tiny_config(), seed=11)
    requests = []
    for i in range(10):
        sampling = {"temperature": 0.9, "seed": i} if i % 2 else {}
        kind = {"prompt": f"request {i}: " + "word " * i} if i % 3 else {"prompt_tokens": [5, 6, 7 + i]}
        requests.append({"id": f"r{i}", "max_new_tokens": 4 + i, **kind, **sampling})
    (root / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    (root / "cache").mkdir()
    return root


def job_command(workdir: Path, output: str) -> list[str]:
    return [sys.executable, "-m", "gptoss_dist.generate", f"--config={ROOT / 'configs' / 'tiny.py'}",
            f"--config.checkpoint={workdir / 'hf'}", f"--config.input={workdir / 'requests.jsonl'}",
            f"--config.output={workdir / output}", *ENGINE_FLAGS, *MESH_FLAGS,
            "--config.lock_timeout_s=2"]  # fmt: skip


def launch(workdir: Path, output: str, processes: int, devices: int) -> list[str]:
    return [sys.executable, str(ROOT / "launch" / "local.py"), f"--processes={processes}", f"--devices={devices}",
            "--grace_s=5", "--", *job_command(workdir, output)]  # fmt: skip


def records(path: Path) -> dict[str, dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    by_id = {record["id"]: record for record in lines}
    assert len(by_id) == len(lines), "a record was written twice"
    return by_id


@pytest.fixture(scope="module")
def single_process_run(workdir) -> subprocess.CompletedProcess:
    """The job in one process of 8 devices, logging each program it compiles (or loads from the run's cache)."""
    done = subprocess.run(launch(workdir, "single", 1, 8), env=os.environ | {"JAX_LOG_COMPILES": "1"},
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:]
    return done


@pytest.fixture(scope="module")
def single_process(workdir, single_process_run):
    return records(workdir / "single" / "results.jsonl")


def test_the_job_on_a_mesh_compiles_its_prefill_and_decode_calls_once(single_process_run):
    """One prefill shape (one width, a row per data shard) recurs after decode calls: it compiles once, as the
    slots a call returns keep the layout they were made in (the `active` flags came back replicated)."""
    compiled = Counter(re.findall(r"Finished XLA compilation of jit\((\w+)\)", single_process_run.stdout))
    assert compiled["prefill"] == 1 and compiled["decode"] == 1, compiled


def test_a_dead_process_stops_the_others_and_a_rerun_completes_exactly_once(workdir, single_process):
    output = workdir / "killed" / "results.jsonl"
    log = (workdir / "killed.log").open("w")
    launcher = subprocess.Popen(launch(workdir, "killed", 2, 4), stdout=log, stderr=subprocess.STDOUT, text=True)
    worker = wait_for_job_process(launcher, output, process_id="1")
    killed_at = time.monotonic()
    os.kill(worker, signal.SIGKILL)
    status = launcher.wait(timeout=90)
    assert time.monotonic() - killed_at < 60
    assert status != 0
    killed_log = (workdir / "killed.log").read_text()
    assert "process 1 exited with status -9; stopping the others" in killed_log
    assert "Traceback" not in killed_log  # the survivor, if it saw its peer go, said so in one line
    assert all(not pid_alive(pid) for pid in child_pids(launcher.pid))

    rerun = subprocess.run(launch(workdir, "killed", 2, 4), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert records(output) == single_process


def child_pids(parent: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found]


def process_env(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def test_tpu_pod_script_runs_the_job_on_every_worker_and_a_dead_worker_stops_the_others(
    workdir, single_process, tmp_path
):
    """Two workers, each a process of 4 CPU devices on mesh (2, 2, 2). Worker 1's job is killed: worker 0 stops
    within 60 s, naming it, rather than waiting on JAX; a rerun writes what one process writes, exactly once."""
    fake_root = tmp_path / "tpu"
    fake_root.mkdir()
    path = f"{ROOT / 'tests' / 'fake_gcloud'}{os.pathsep}{os.environ['PATH']}"
    env = os.environ | {"FAKE_TPU_ROOT": str(fake_root), "FAKE_TPU_WORKERS": "2", "FAKE_TPU_CPU_DEVICES": "4",
                        "PATH": path}  # fmt: skip
    command = ["bash", str(ROOT / "launch" / "tpu_pod.sh"), "--tpu=demo-pod", "--zone=us-central2-b",
               "--project=demo", "--config=configs/tiny.py", "--install=python3 -c 'import jax'",
               f"--config.checkpoint={workdir / 'hf'}", f"--config.input={workdir / 'requests.jsonl'}",
               f"--config.output={workdir / 'pod'}", *ENGINE_FLAGS, *MESH_FLAGS,
               "--config.distributed.peer_timeout_s=15", "--config.lock_timeout_s=2"]  # fmt: skip
    output = workdir / "pod" / "results.jsonl"
    with (tmp_path / "killed.log").open("w") as log:
        launcher = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        worker = wait_for_job_process(launcher, output, process_id="1")
        killed_at = time.monotonic()
        os.kill(worker, signal.SIGKILL)
        status = launcher.wait(timeout=90)
    assert time.monotonic() - killed_at < 60
    assert status != 0
    killed_log = (tmp_path / "killed.log").read_text()
    said = [line for line in killed_log.splitlines() if "gptoss-generate: error: process 0 of 2 stopped" in line]
    assert len(said) == 1 and said[0].startswith("[worker 0]")  # after worker 0's progress bar, on its line
    assert "stopped: process 1 of 2 (host " in said[0] and "has not answered for 15 s" in said[0]
    assert "Traceback" not in killed_log

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    calls = (fake_root / "gcloud.log").read_text().splitlines()
    assert calls[0].startswith("compute tpus tpu-vm scp") and "--worker=all" in calls[0]
    assert calls[1].startswith("compute tpus tpu-vm ssh demo-pod") and "--config.distributed.tpu_pod=true" in calls[1]
    for worker in ("worker-0", "worker-1"):  # each worker got and ran its own copy of the code
        assert (fake_root / worker / "gptoss-dist" / "gptoss_dist" / "generate.py").exists()
    assert "[worker 1]" in done.stdout and "done by an earlier run" in done.stdout
    assert records(output) == single_process


def wait_for_job_process(launcher: subprocess.Popen, output: Path, process_id: str) -> int:
    """The pid of the job's process `process_id` under `launcher`, once the job has written two records."""
    deadline = time.monotonic() + 300
    while not (output.exists() and output.read_text().count("\n") >= 2) and launcher.poll() is None:
        assert time.monotonic() < deadline, "the job wrote nothing"
        time.sleep(0.2)
    assert launcher.poll() is None, "the job ended before it could be killed"
    return next(pid for pid in descendant_pids(launcher.pid) if process_env(pid).get("GPTOSS_PROCESS_ID") == process_id
                and "-m\0gptoss_dist.generate" in Path(f"/proc/{pid}/cmdline").read_text())  # fmt: skip


def descendant_pids(parent: int) -> list[int]:
    children = child_pids(parent)
    return children + [pid for child in children for pid in descendant_pids(child)]


@pytest.mark.parametrize("model", ["20b", "120b"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 4, 2), (2, 8, 4), (1, 16, 8)], ids=str)
def test_plan_weight_bytes_equal_jax_shard_shapes(model, shape):
    """Two layers, one of each kind, of the model's widths and experts: every layer of a kind holds the same
    weights, so more layers repeat the same shard shapes (and the abstract model of 36 takes seconds to build)."""
    cfg = ModelConfig(num_layers=2, num_experts=32 if model == "20b" else 128, layer_types=(SLIDING, FULL))
    sizes = dict(zip(MESH_AXES, shape))
    mesh = AbstractMesh(shape, MESH_AXES)
    expected = 0
    for placement in weight_placements(cfg, sizes):
        shard = NamedSharding(mesh, placement.spec).shard_shape(placement.shape)
        expected += math.prod(shard) * 2  # bfloat16
    assert plan.plan_memory(cfg, sizes, max_slots=8, max_len=1024).weights == expected


def test_job_refuses_what_cannot_fit_before_reading_weights(tmp_path):
    checkpoint = tmp_path / "20b-config-only"  # config.json, and no weights at all
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps(ModelConfig().to_hf_dict()))
    (tmp_path / "in.jsonl").write_text('{"id": "a", "prompt": "hi"}\n')
    done = subprocess.run(
        [sys.executable, "-m", "gptoss_dist.generate", f"--config={ROOT / 'configs' / 'gpt_oss_20b.py'}",
         f"--config.checkpoint={checkpoint}", f"--config.input={tmp_path / 'in.jsonl'}",
         f"--config.output={tmp_path / 'out'}", "--config.chip=v5e"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2
    assert "per chip, v5e has 16 GiB" in done.stderr and "raise mesh.tensor or mesh.expert" in done.stderr
    assert not (tmp_path / "out").exists()


def test_plan_command_prints_every_chip_and_the_pools_tokens():
    done = subprocess.run([sys.executable, "-m", "gptoss_dist.plan", f"--config={ROOT / 'configs' / 'gpt_oss_20b.py'}",
                           "--config.mesh.tensor=4", "--config.mesh.data=2", "--config.max_slots=16",
                           "--config.max_len=2048", "--config.page_size=128", "--config.kv_pages=100"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "the KV pool holds 6,400 tokens per chip" in done.stdout  # 100 pages of 128 over 2 data shards
    rows = {line.split()[0]: line for line in done.stdout.splitlines()[3:]}
    assert set(rows) == set(plan.CHIPS)
    assert rows["v5e"].endswith("yes") and rows["v5e"].split()[1] == "16"


def run_launcher(script: str, grace_s: float) -> subprocess.CompletedProcess:
    """launch/local.py running `python -c script` as two processes."""
    command = [sys.executable, str(ROOT / "launch" / "local.py"), "--processes=2", "--devices=1", f"--grace_s={grace_s}",
               "--", sys.executable, "-c", script]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "status, meaning",
    [(1, "the job ran to its end, and some requests failed"), (2, "the job could not start: its error says why")],
)
def test_every_process_ending_with_a_job_status_is_said_plainly(status, meaning):
    done = run_launcher(f"import sys; sys.exit({status})", grace_s=10)
    assert done.returncode == status
    assert f"[launch] every process exited with status {status}: {meaning}" in done.stderr
    assert "stopping the others" not in done.stderr


def test_one_process_failing_while_the_others_run_stops_them():
    done = run_launcher("import os, sys, time; os.environ['GPTOSS_PROCESS_ID'] == '1' and sys.exit(1); time.sleep(60)",
                        grace_s=1)  # fmt: skip
    assert done.returncode == 1
    assert "[launch] process 1 exited with status 1; stopping the others" in done.stderr
