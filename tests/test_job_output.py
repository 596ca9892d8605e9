"""A batch job that no input can wedge: lines of any bytes each end once, in the results or the errors; an
output knows the input and settings that made it, refuses others and retries errors on request; one job
at a time writes it, and a dead job's lock is taken over; an output that cannot be written, or holds what
is not a job's records, is refused before any weight is read; a converted checkpoint with a missing or
damaged chunk fails, naming it. Jobs run in this process where they can, with the engine shapes of every
job in the tests (job_fixtures), which this process then compiles once.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gptoss_dist import job_files
from gptoss_dist.config import ModelConfig
from job_fixtures import ROOT, cli, job_config, read_output, run, run_cli, write_jsonl

pytest_plugins = ["gcs_emulator", "job_fixtures"]

GOOD = [{"id": "a", "prompt": "Hello"}, {"id": "b", "prompt_tokens": [1, 2, 3]}, {"id": "c", "prompt": "The sky"}]
FEW_TOKENS = {"sampling.max_new_tokens": 2}


def outcomes(output) -> dict[int, dict[str, Any]]:
    """Every record of a job's output by input line; fails if a line or a result's id is there twice."""
    results, errors = read_output(output, job_files.RESULTS), read_output(output, job_files.ERRORS)
    lines = [record["line"] for record in results + errors]
    assert len(lines) == len(set(lines)), f"lines twice: {sorted(n for n in set(lines) if lines.count(n) > 1)}"
    ids = [record["id"] for record in results]
    assert len(ids) == len(set(ids)), f"results twice: {sorted(i for i in set(ids) if ids.count(i) > 1)}"
    return {record["line"]: record for record in results + errors}


def output_bytes(output: Path) -> dict[str, bytes]:
    return {name: (output / f"{name}.jsonl").read_bytes() for name in (job_files.RESULTS, job_files.ERRORS)}


# ------------------------------------------------------------------------------------------- poison lines

DEEP = '{"id": "deep", "prompt": "x", "stop": ' + "[" * 200_000
POISON = {  # line -> (text, part of its error; None: a result)
    2: ('{"id": "a\\ud800", "prompt": "Hello"}', None),  # a lone surrogate in the id, copied out escaped
    3: ('{"id": "p", "prompt": "a\\udc80b"}', 'prompt is not valid text: a lone surrogate "\\udc80" at 1'),
    4: ('{"id": "m", "messages": [{"role": "user", "content": "x\\ud800"}]}',
        'messages[0].content is not valid text: a lone surrogate "\\ud800" at 1'),
    5: ('{"id": "s", "prompt": "x", "stop": ["\\udfff"]}', "stop is not valid text"),
    6: (DEEP, "not valid JSON: maximum recursion depth exceeded"),
    7: ('{"id": "flip", "prompt": "caf\\u00e9"}'.replace("\\u00e9", "\xe9"), None),
}  # fmt: skip


def test_poison_lines_each_get_their_error_and_the_rest_complete(hf_checkpoint, tmp_path):
    lines = [json.dumps(GOOD[0]), *(text for text, _ in POISON.values()), json.dumps(GOOD[2])]
    (tmp_path / "in.jsonl").write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + b"\n")
    config = job_config(hf_checkpoint, tmp_path / "in.jsonl", tmp_path / "out", **FEW_TOKENS)
    summary = run(config)
    assert (summary.ok, summary.failed) == (4, 4)
    done = outcomes(tmp_path / "out")
    assert sorted(done) == list(range(1, 9))
    for line, (_, error) in POISON.items():
        assert (error is None) == ("error" not in done[line]), done[line]
        assert error is None or error in done[line]["error"], done[line]
    assert done[2]["id"] == "a\ud800"  # read back as it was
    assert b'"a\\ud800"' in (tmp_path / "out" / "results.jsonl").read_bytes()
    before = output_bytes(tmp_path / "out")
    again = run(config)
    assert (again.ok, again.failed, again.done_before, again.exit_code) == (0, 0, 8, 1)
    assert output_bytes(tmp_path / "out") == before


# ------------------------------------------------------------------------------------ what made an output


@pytest.fixture
def done_job(hf_checkpoint, tmp_path):
    """A finished job over GOOD and a bad line (line 2): its input path and config."""
    input_path = write_jsonl(tmp_path / "in.jsonl", [GOOD[0], '{"id": "fixme", "prompt": ', GOOD[1], GOOD[2]])
    config = job_config(hf_checkpoint, input_path, tmp_path / "out", **FEW_TOKENS)
    assert run(config).failed == 1
    return Path(input_path), config


def test_changed_input_or_setting_is_refused_naming_the_line_or_setting(done_job):
    input_path, config = done_job
    before = output_bytes(Path(config.output))
    input_path.write_text(input_path.read_text().replace('"The sky"', '"The sea"'))
    with pytest.raises(job_files.OutputError, match=rf"{input_path}, line 4, differs from .* which holds its result"):
        run(config)
    config.retry_errors = True  # does not let a line with a result change
    with pytest.raises(job_files.OutputError, match=r"line 4, differs from .* which holds its result"):
        run(config)
    config.retry_errors, config.sampling.temperature = False, 0.5
    with pytest.raises(job_files.OutputError, match=r"made with sampling.temperature=0.0, not 0.5"):
        run(config)
    assert output_bytes(Path(config.output)) == before


def test_fixed_line_reruns_with_retry_errors_and_every_line_ends_once(done_job):
    input_path, config = done_job
    broken = input_path.read_text()
    # Fixed, but with the id of a later line's result: a duplicate, not a second result.
    input_path.write_text(broken.replace('{"id": "fixme", "prompt": ', '{"id": "c", "prompt": "Hi"}'))
    with pytest.raises(job_files.OutputError, match=r"line 2, differs .* set --config.retry_errors=true"):
        run(config)
    config.retry_errors = True
    summary = run(config)
    assert (summary.ok, summary.failed, summary.done_before, summary.exit_code) == (0, 1, 3, 1)
    assert outcomes(config.output)[2]["error"] == "duplicate id 'c', line 4 holds its result"
    input_path.write_text(broken.replace('{"id": "fixme", "prompt": ', '{"id": "fixed", "prompt": "Hi"}'))
    summary = run(config)
    assert (summary.ok, summary.failed, summary.done_before, summary.exit_code) == (1, 0, 3, 0)
    done = outcomes(config.output)
    assert {line: record["id"] for line, record in done.items()} == {1: "a", 2: "fixed", 3: "b", 4: "c"}
    assert not read_output(config.output, job_files.ERRORS)  # the superseded errors are gone
    config.retry_errors = False  # the output now knows the fixed input
    again = run(config)
    assert (again.ok, again.failed, again.done_before, again.exit_code) == (0, 0, 4, 0)


# ----------------------------------------------------------------------------------------------- the lock


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_a_job_on_a_locked_output_is_refused_naming_the_holder(request, where, hf_checkpoint, tmp_path):
    base = str(tmp_path) if where == "local" else f"{request.getfixturevalue('gcs_bucket')}/{tmp_path.name}"
    config = job_config(hf_checkpoint, write_jsonl(f"{base}/in.jsonl", GOOD), f"{base}/out", **FEW_TOKENS)
    with job_files.OutputLock(config.output, timeout_s=60) as holder:
        holder.acquire()
        with pytest.raises(job_files.LockError, match=rf"{config.output} is in use by another job: {holder.holder}, "
                                                    r"started .*, its lock renewed \d+ s ago"):  # fmt: skip
            run(config)
    assert run(config).ok == 3  # released: the next job takes it


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_two_jobs_taking_a_lock_at_once_one_wins(request, where, tmp_path):
    base = str(tmp_path) if where == "local" else f"{request.getfixturevalue('gcs_bucket')}/{tmp_path.name}"
    locks = [job_files.OutputLock(f"{base}/out", timeout_s=60) for _ in range(4)]
    outcome: list[str] = []
    start = threading.Barrier(len(locks))

    def take(lock):
        start.wait()
        try:
            lock.acquire()
            outcome.append("held")
        except job_files.LockError:
            outcome.append("refused")

    threads = [threading.Thread(target=take, args=(lock,)) for lock in locks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcome) == ["held", "refused", "refused", "refused"]
    for lock in locks:
        lock.release()


def test_second_concurrent_job_is_refused_and_the_first_writes_each_record_once(hf_checkpoint, tmp_path):
    lines = [{"id": f"r{i:02d}", "prompt_tokens": [1 + i, 2, 3], "max_new_tokens": 24} for i in range(16)]
    config = job_config(hf_checkpoint, write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(run, config)
        while not read_output(config.output, job_files.RESULTS) and not first.done():
            time.sleep(0.01)
        assert not first.done(), "the first job ended before the second started"
        with pytest.raises(job_files.LockError, match=rf"{config.output} is in use by another job: .* pid {os.getpid()}"):
            run(config)
        assert first.result().ok == len(lines)
    assert sorted(record["id"] for record in outcomes(config.output).values()) == [line["id"] for line in lines]


def dead_jobs_lock(output: Path, renewed_ago_s: float) -> None:
    """The lock a killed job leaves: never released, last renewed `renewed_ago_s` ago."""
    output.mkdir(parents=True, exist_ok=True)
    state = {"holder": "elsewhere pid 1", "started": time.time() - 3600, "renewed": time.time() - renewed_ago_s,
             "released": False}  # fmt: skip
    (output / f"{job_files.LOCK_PREFIX}00003").write_text(json.dumps(state))


def test_a_dead_jobs_lock_is_taken_over_after_the_timeout(hf_checkpoint, tmp_path):
    config = job_config(hf_checkpoint, write_jsonl(tmp_path / "in.jsonl", GOOD), tmp_path / "out", lock_timeout_s=30)
    dead_jobs_lock(tmp_path / "out", renewed_ago_s=10)
    with pytest.raises(job_files.LockError, match=r"in use by another job: elsewhere pid 1, .* renewed 10 s ago; "
                                                r"a lock not renewed for lock_timeout_s=30 s"):  # fmt: skip
        run(config)
    dead_jobs_lock(tmp_path / "out", renewed_ago_s=31)
    assert run(config).ok == 3
    (lock,) = (tmp_path / "out").glob(f"{job_files.LOCK_PREFIX}*")
    assert lock.name == f"{job_files.LOCK_PREFIX}00004" and json.loads(lock.read_text())["released"]


def test_a_job_whose_lock_was_taken_over_writes_no_more(tmp_path):
    stalled = job_files.OutputLock(str(tmp_path / "out"), timeout_s=0.2)
    stalled.acquire()
    output = job_files.JobOutput(str(tmp_path / "out"), lock=stalled)
    output.resume(job_files.Manifest({}, {1: "x"}), "in.jsonl", retry_errors=False)
    output.start_writing()
    output.write_result({"line": 1, "id": "a"})
    (tmp_path / "out" / f"{job_files.LOCK_PREFIX}00001").write_text("{}")  # another job took it over
    time.sleep(0.2)
    with pytest.raises(job_files.LockError, match="another job took its output over"):
        output.write_result({"line": 2, "id": "b"})
    stalled.release()
    output.close()
    assert [record["id"] for record in read_output(tmp_path / "out", job_files.RESULTS)] == ["a"]


# ------------------------------------------------------------------------------------ an unusable output


@pytest.fixture
def config_only_checkpoint(tmp_path) -> Path:
    """A checkpoint without weights or tokenizer: a job that got as far as reading them would fail on that."""
    checkpoint = tmp_path / "config-only"
    checkpoint.mkdir()
    cfg = ModelConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                      intermediate_size=64, num_experts=4, experts_per_token=2,
                      layer_types=("sliding_attention", "full_attention"))  # fmt: skip
    (checkpoint / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    return checkpoint


@pytest.mark.parametrize(
    "output, message",
    [("a-file", r"the output .*a-file is a file, not a directory"),
     ("a-file/out", r"cannot write to the output .*a-file/out: .*Not a directory")],
)  # fmt: skip
def test_unusable_output_is_refused_before_any_weight_is_read(config_only_checkpoint, tmp_path, output, message):
    (tmp_path / "a-file").write_text("mine")
    config = job_config(config_only_checkpoint, write_jsonl(tmp_path / "in.jsonl", GOOD), tmp_path / output)
    with pytest.raises(job_files.OutputError, match=message):
        run(config)
    assert (tmp_path / "a-file").read_text() == "mine"


def test_read_only_output_exits_2_before_any_weight_is_read(config_only_checkpoint, tmp_path):
    """On a read-only mount (a tmpfs in a mount namespace of this test's own, so that root cannot write it
    either); the job exits 2 with its error line, not a missing weight's."""
    mount = tmp_path / "read-only"
    mount.mkdir()
    command = cli(config_only_checkpoint, write_jsonl(tmp_path / "in.jsonl", GOOD), mount / "out")
    shell = f"mount -t tmpfs -o ro tmpfs {mount} && exec {' '.join(command)}"
    unshare = ["unshare", "--map-root-user", "--mount", "sh", "-c"]
    if (
        subprocess.run([*unshare, f"mount -t tmpfs -o ro tmpfs {mount}"], capture_output=True, check=False).returncode
        != 0
    ):
        pytest.skip("this machine lets no test make a read-only mount (unshare)")
    done = subprocess.run([*unshare, shell], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"gptoss-generate: error: cannot write to the output {mount / 'out'}: " in done.stderr
    assert "Read-only file system" in done.stderr


@pytest.mark.parametrize("name", [job_files.RESULTS, job_files.ERRORS])
@pytest.mark.parametrize("text", ['{"a": 1}', "[1, 2]", '{"line": "3", "id": "x"}'])
def test_existing_output_that_holds_no_job_records_is_refused(config_only_checkpoint, tmp_path, name, text):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / f"{name}.jsonl").write_text(text + "\n")
    config = job_config(config_only_checkpoint, write_jsonl(tmp_path / "in.jsonl", GOOD), tmp_path / "out")
    with pytest.raises(job_files.OutputError, match=rf"{name}.jsonl, line 1: not a job's record: .*is this a job's"):
        run(config)


def test_records_without_a_record_of_what_made_them_are_refused(config_only_checkpoint, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.jsonl").write_text('{"line": 1, "id": "a"}\n')
    config = job_config(config_only_checkpoint, write_jsonl(tmp_path / "in.jsonl", GOOD), tmp_path / "out")
    with pytest.raises(job_files.OutputError, match="holds records but no job.json"):
        run(config)


# ------------------------------------------------------------------------------------- damaged checkpoints


def test_job_on_a_checkpoint_with_a_missing_chunk_exits_2_naming_it(converted, tmp_path):
    broken = shutil.copytree(converted, tmp_path / "broken")
    (broken / "embed" / "c" / "0" / "0").unlink()
    done = run_cli(cli(broken, write_jsonl(tmp_path / "in.jsonl", GOOD), tmp_path / "out"))
    assert done.returncode == 2, done.stderr[-3000:]
    (error,) = [line for line in done.stderr.splitlines() if line.startswith("gptoss-generate: error: ")]
    assert f"{broken}/embed, elements [0:512, 0:64]: NOT_FOUND: chunk" in error and "is missing" in error
    assert "Traceback" not in done.stderr


# ------------------------------------------------------------------------------------------------- fuzzing


def mutate(line: bytes, rng: np.random.Generator) -> bytes:
    """One random damage: bytes flipped, cut short, nested deep, or encoded otherwise."""
    kind = rng.integers(5)
    if kind == 0:  # bytes flipped
        data = bytearray(line)
        for position in rng.integers(0, len(data), rng.integers(1, 4)):
            data[position] ^= 1 << int(rng.integers(8))
        return bytes(data)
    if kind == 1:  # cut short
        return line[: rng.integers(1, len(line))]
    if kind == 2:  # a field nested deep
        depth = int(rng.choice([3, 900, 5000, 200_000]))
        return line[:-1] + b', "stop": ' + b"[" * depth + b"]" * (depth if rng.integers(2) else 0) + b"}"
    if kind == 3:  # a lone surrogate, escaped
        return line.replace(b'"prompt": "', b'"prompt": "\\udc9f', 1)
    return line.decode().encode(str(rng.choice(["latin-1", "utf-16"])), "replace")  # Latin-1 or UTF-16


def test_fuzzed_lines_each_end_once_and_a_rerun_changes_nothing(hf_checkpoint, tmp_path):
    rng = np.random.default_rng(21)
    texts = ["Hello", "naïve café 🙂", "1, 2, 3,"]
    lines = []
    for i in range(500):
        record = {"id": f"f{i:03d}", "prompt": texts[i % 3], "max_new_tokens": 1 + i % 2, "seed": i}
        lines.append(mutate(json.dumps(record, ensure_ascii=False).encode(), rng))
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    config = job_config(hf_checkpoint, tmp_path / "in.jsonl", tmp_path / "out", **FEW_TOKENS)
    summary = run(config)
    expected = [number for number, _ in job_files.read_lines(str(tmp_path / "in.jsonl"))]
    assert sorted(outcomes(tmp_path / "out")) == expected
    assert summary.ok + summary.failed == len(expected) and summary.ok > 10 and summary.failed > 300
    before = output_bytes(tmp_path / "out")
    again = run(config)
    assert (again.ok, again.failed, again.done_before) == (0, 0, len(expected))
    assert output_bytes(tmp_path / "out") == before
