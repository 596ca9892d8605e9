"""JSONL files for the batch job, on local disk or in an object store (`gs://`), and exactly-once output.

Input is read as numbered lines, streaming, through fsspec (gcsfs, imported by fsspec only for `gs://`).

Output is a directory that knows what made it, is written by one job at a time, and holds two record logs,
`results` and `errors`. Each record is one JSON object on one line that names its input line, and a log reads
back the records it already holds, so a job that is killed and started again skips what is done
(`JobOutput`) and every input line lands exactly once, whole:

- `job.json`: the settings that change results and a fingerprint of each input line (`Manifest`), written
  before the first record. A rerun must bring the same: its outcomes are kept by line, which holds only while
  the line is the one that made them. A line may differ only where it has no result and the rerun retries
  errors; its error, if it has one, is dropped (the line is then simply not done) before the new `job.json`
  is written, so a rerun killed in between finds each line either done by its own content or not done.
- `job.lock-NNNNN`: the lock of the job writing the directory (`OutputLock`).
- Local directory: `results.jsonl` and `errors.jsonl`. Each record is appended as one line and flushed and
  fsynced before the job moves on. A trailing partial line (a write cut off by a kill) is not a record, and
  the writer cuts it off, truncating the file after its last newline, before it appends; that record was
  never counted as done, so it runs again.
  A killed job loses at most the requests in flight.
- Object store (`gs://...`): objects cannot be appended to, so records are buffered and uploaded in numbered
  parts, `results-00000.jsonl`, `results-00001.jsonl`, ..., each in one request: an object appears whole or
  not at all. A part goes up once it holds `part_records` records or its oldest record has waited
  `part_seconds`, and when the job ends. On opening, the parts are listed and read, and new parts continue
  the numbering. A killed job loses at most the records not yet uploaded, and the rerun redoes them.

Records hold any text: a string UTF-8 cannot encode (a lone surrogate, which a JSON input can escape) makes
its record's line ASCII, with JSON escapes, so that it reads back as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import posixpath
import re
import socket
import threading
import time
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import fsspec

from gptoss_dist.paths import is_local, join, write_atomically

RESULTS, ERRORS = "results", "errors"
MANIFEST_FILE = "job.json"
MANIFEST_FORMAT = "gptoss-dist/job/1"
LOCK_PREFIX = "job.lock-"
RENEWALS_PER_TIMEOUT = 4  # a live job renews its lock this many times within the timeout


class InputError(Exception):
    """The input file cannot be read."""


# ------------------------------------------------------------------------------------------------ input


def open_input(url: str) -> BinaryIO:
    """The input file, opened for reading; InputError, naming it, if it cannot be."""
    try:
        return fsspec.open(url, "rb").open()
    except (OSError, ValueError, ImportError) as err:  # ImportError: no filesystem package for its scheme
        raise InputError(f"cannot read the input {url}: {err}") from err


def read_lines(url: str) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, line) for each line of `url` that is not blank. The file is opened at the call,
    so an unreadable path fails there, not at the first line."""
    handle = open_input(url)

    def lines() -> Iterator[tuple[int, bytes]]:
        with handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield number, line

    return lines()


def fingerprint(line: bytes) -> str:
    """A short digest of an input line (its line break aside)."""
    return hashlib.blake2b(line.rstrip(b"\r\n"), digest_size=8).hexdigest()


def read_fingerprints(url: str) -> dict[int, str]:
    """The fingerprint of each line of `url` that is not blank, by line number."""
    return {number: fingerprint(line) for number, line in read_lines(url)}


# ----------------------------------------------------------------------------------------------- output


class OutputError(Exception):
    """The output cannot be written, or holds something that this job must not add to: the message names the
    file, the line or the setting."""


class LockError(OutputError):
    """Another job writes the output, or took it over from this one."""


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_record(value: Any) -> bool:
    """Whether `value` looks like a job's record: results and errors both name their input line and id."""
    return (
        isinstance(value, dict)
        and type(value.get("line")) is int
        and "id" in value
        and isinstance(value["id"], (str, type(None)))
    )


def _parse_lines(lines: Iterable[bytes], where: str) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """(line, record) for each line of a log."""
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except ValueError as err:
            raise OutputError(f"{where}, line {number}: not a JSON record ({err}); is this a job's output?") from None
        if not _is_record(record):
            raise OutputError(f"{where}, line {number}: not a job's record: {_show(record)}; is this a job's output?")
        yield line, record


def _json_line(record: dict[str, Any]) -> bytes:
    try:
        return (json.dumps(record, ensure_ascii=False) + "\n").encode()
    except UnicodeEncodeError:  # a lone surrogate: escaped, it reads back as it was
        return (json.dumps(record) + "\n").encode()


def _cut_partial_line(path: Path, block: int = 1 << 16) -> None:
    """Truncates `path` after its last newline: a last line without one is a write that a kill cut off."""
    with path.open("rb+") as file:
        end = file.seek(0, os.SEEK_END)
        while end > 0:
            start = max(0, end - block)
            file.seek(start)
            newline = file.read(end - start).rfind(b"\n")
            if newline >= 0:
                file.truncate(start + newline + 1)
                return
            end = start
        file.truncate(0)


class LocalLog:
    """`directory/name.jsonl`, appended to one durable line at a time (once `start_writing` is called)."""

    def __init__(self, directory: str, name: str):
        self.path = Path(fsspec.core.url_to_fs(directory)[1]) / f"{name}.jsonl"
        self._file: BinaryIO | None = None

    def entries(self) -> Iterator[tuple[bytes, dict[str, Any]]]:
        """(line, record) for the records written so far (a trailing partial line, a write a kill cut off, is
        not one)."""
        if not self.path.exists():
            return
        with self.path.open("rb") as file:
            yield from _parse_lines((line for line in file if line.endswith(b"\n")), str(self.path))

    def drop(self, lines: Collection[int]) -> None:
        """Removes the records of input `lines`, replacing the file whole."""
        kept = [line for line, record in self.entries() if record["line"] not in lines]
        if self.path.exists():
            write_atomically(str(self.path), b"".join(kept))

    def start_writing(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()
        _cut_partial_line(self.path)
        self._file = self.path.open("ab")

    def append(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return  # not the writing process
        self._file.write(_json_line(record))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def describe(self) -> str:
        return str(self.path)


class PartsLog:
    """`directory/name-NNNNN.jsonl` parts in an object store, each uploaded whole."""

    def __init__(self, directory: str, name: str, *, part_records: int, part_seconds: float):
        self.fs, root = fsspec.core.url_to_fs(directory)
        self.directory, self.name = directory.rstrip("/"), name
        self.part_records, self.part_seconds = part_records, part_seconds
        self.fs.invalidate_cache(root)  # a listing cached by this process may be stale
        self._parts = [f"{self.directory}/{posixpath.basename(part)}"
                       for part in sorted(self.fs.glob(posixpath.join(root, f"{name}-*.jsonl")))]  # fmt: skip
        numbers = [re.fullmatch(rf"{name}-(\d+)\.jsonl", posixpath.basename(part)) for part in self._parts]
        self._next_part = 1 + max((int(match[1]) for match in numbers if match), default=-1)
        self._waiting: list[bytes] = []
        self._oldest = 0.0
        self._writing = False

    def _records(self, part: str) -> list[tuple[bytes, dict[str, Any]]]:
        return list(_parse_lines(self.fs.cat_file(part).splitlines(keepends=True), part))

    def entries(self) -> Iterator[tuple[bytes, dict[str, Any]]]:
        """(line, record) for the records of the parts there were when this log was opened."""
        for part in self._parts:
            yield from self._records(part)

    def drop(self, lines: Collection[int]) -> None:
        """Removes the records of input `lines`: each part that holds some is replaced whole, or deleted."""
        for part in list(self._parts):
            records = self._records(part)
            kept = [line for line, record in records if record["line"] not in lines]
            if len(kept) == len(records):
                continue
            if kept:
                write_atomically(part, b"".join(kept))
            else:
                self.fs.rm(part)
                self._parts.remove(part)

    def start_writing(self) -> None:
        self._writing = True

    def append(self, record: dict[str, Any]) -> None:
        if not self._writing:
            return  # not the writing process
        if not self._waiting:
            self._oldest = time.monotonic()
        self._waiting.append(_json_line(record))
        if len(self._waiting) >= self.part_records or time.monotonic() - self._oldest >= self.part_seconds:
            self.upload()

    def upload(self) -> None:
        """Uploads the waiting records as the next part."""
        if self._waiting:
            self.fs.pipe_file(f"{self.directory}/{self.name}-{self._next_part:05d}.jsonl", b"".join(self._waiting))
            self._next_part += 1
            self._waiting = []

    def close(self) -> None:
        self.upload()

    def describe(self) -> str:
        return f"{self.directory}/{self.name}-*.jsonl"


def open_log(directory: str, name: str, *, part_records: int, part_seconds: float) -> LocalLog | PartsLog:
    if is_local(directory):
        return LocalLog(directory, name)
    return PartsLog(directory, name, part_records=part_records, part_seconds=part_seconds)


# ------------------------------------------------------------------------------------------------- lock


def _when(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="seconds")


class OutputLock:
    """The lock of the one job that writes an output directory: objects `job.lock-NNNNN`, each created only
    where it does not exist yet (locally a hard link, on `gs://` the generation precondition
    ifGenerationMatch=0), so two jobs never create the same one. The highest number holds the lock.

    The holder renews its object every `timeout_s / RENEWALS_PER_TIMEOUT` seconds and marks it released when
    it ends. A job finds the directory free if it has no lock or its highest lock is released; held if that
    lock was renewed within `timeout_s` (by the clocks of the two hosts); and a dead job's otherwise, which it
    takes over by creating the next number. A holder that finds a higher number has lost the lock (it stalled
    past the timeout) and writes no more records (`check`).
    """

    def __init__(self, directory: str, timeout_s: float):
        self.directory, self.timeout_s = directory.rstrip("/"), timeout_s
        self.fs, self.root = fsspec.core.url_to_fs(self.directory)
        self.holder = f"{socket.gethostname()} pid {os.getpid()}"
        self.started = time.time()
        self._number: int | None = None
        self._lost_to: str | None = None
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew_until_released, name="output lock", daemon=True)

    def acquire(self) -> None:
        """Takes the lock, creating the directory: OutputError if it cannot be written, LockError, naming the
        holder, if another job holds it."""
        self._make_directory()
        locks = self._locks()
        if locks:
            self._refuse_if_held(max(locks))
        number = max(locks, default=-1) + 1
        try:
            write_atomically(self._path(number), self._state(released=False), create=True)
        except FileExistsError:
            raise LockError(f"{self.directory}: another job took its lock first: {self._describe(number)}") from None
        except OSError as err:
            raise OutputError(f"cannot write to the output {self.directory}: {err}") from err
        self._number = number
        for older in locks:
            with contextlib.suppress(FileNotFoundError):  # another job's cleanup got there first
                self.fs.rm(self._path(older))
        self._renewer.start()

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *_) -> None:
        self.release()

    def check(self) -> None:
        """LockError if another job has taken the lock over."""
        if self._lost_to is not None:
            raise LockError(
                f"{self.directory}: this job stalled for more than lock_timeout_s={self.timeout_s:g} s and "
                f"another job took its output over ({self._lost_to}); it writes no more records"
            )

    def release(self) -> None:
        """Marks the lock released, if this job still holds it."""
        if self._number is None:
            return
        self._stop.set()
        self._renewer.join()
        if self._lost_to is None:
            try:
                write_atomically(self._path(self._number), self._state(released=True))
            except OSError:  # the lock is then a dead job's, taken over after the timeout
                pass
        self._number = None

    def _make_directory(self) -> None:
        if self.fs.isfile(self.root):
            raise OutputError(f"the output {self.directory} is a file, not a directory")
        try:
            self.fs.makedirs(self.root, exist_ok=True)
        except OSError as err:
            raise OutputError(f"cannot write to the output {self.directory}: {err}") from err

    def _path(self, number: int) -> str:
        return join(self.directory, f"{LOCK_PREFIX}{number:05d}")

    def _locks(self) -> list[int]:
        self.fs.invalidate_cache(self.root)
        names = (posixpath.basename(path) for path in self.fs.glob(posixpath.join(self.root, f"{LOCK_PREFIX}*")))
        return [int(match[1]) for name in names if (match := re.fullmatch(rf"{re.escape(LOCK_PREFIX)}(\d+)", name))]

    def _state(self, *, released: bool) -> bytes:
        state = {"holder": self.holder, "started": self.started, "renewed": time.time(), "released": released}
        return json.dumps(state).encode()

    def _read(self, number: int) -> dict[str, Any]:
        path = self._path(number)
        try:
            state = json.loads(self.fs.cat_file(path))
            return {key: state[key] for key in ("holder", "started", "renewed", "released")}
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise LockError(f"{path}: not a readable lock ({err}); remove it if no job writes {self.directory}")

    def _describe(self, number: int) -> str:
        """Who holds lock `number`, and since when (what is wrong with it, if it cannot be read)."""
        try:
            state = self._read(number)
        except LockError as err:
            return str(err)
        age = time.time() - state["renewed"]
        return f"{state['holder']}, started {_when(state['started'])}, its lock renewed {age:.0f} s ago"

    def _refuse_if_held(self, number: int) -> None:
        state = self._read(number)
        if not state["released"] and time.time() - state["renewed"] < self.timeout_s:
            raise LockError(
                f"{self.directory} is in use by another job: {self._describe(number)}; a lock not renewed for "
                f"lock_timeout_s={self.timeout_s:g} s is a dead job's, and is taken over"
            )

    def _renew_until_released(self) -> None:
        while not self._stop.wait(self.timeout_s / RENEWALS_PER_TIMEOUT):
            try:
                if (newest := max(self._locks(), default=-1)) > self._number:
                    self._lost_to = self._describe(newest)
                    return
                write_atomically(self._path(self._number), self._state(released=False))
            except OSError:  # a passing storage failure: the next renewal tries again
                continue


# ------------------------------------------------------------------------------------- what made an output


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What made an output: the settings that change results (flat, dotted names) and the fingerprint of each
    input line that is not blank."""

    settings: dict[str, Any]
    lines: dict[int, str]

    def to_json(self) -> bytes:
        lines = {str(number): digest for number, digest in self.lines.items()}
        return json.dumps({"format": MANIFEST_FORMAT, "settings": self.settings, "lines": lines}).encode()

    @classmethod
    def read(cls, path: str) -> Manifest | None:
        """The manifest at `path`; None if there is none, OutputError if it is not one."""
        fs = fsspec.core.url_to_fs(path)[0]
        if not fs.exists(path):
            return None
        try:
            data = json.loads(fs.cat_file(path))
            if data["format"] != MANIFEST_FORMAT:
                raise ValueError(f"format {data['format']!r}, expected {MANIFEST_FORMAT!r}")
            return cls(dict(data["settings"]), {int(number): digest for number, digest in data["lines"].items()})
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise OutputError(f"{path}: not a job's record of its input and settings ({err})") from None


def _samples_of(log: LocalLog | PartsLog) -> dict[int, dict[int, str | None]]:
    """The id of each sample (`index`, 0 for a record without one) of each input line that `log` holds a record
    of, by line and index."""
    samples: dict[int, dict[int, str | None]] = {}
    for _, record in log.entries():
        line, index = record["line"], record.get("index", 0)
        if index in samples.setdefault(line, {}):
            sample = f", sample {index}" if index else ""
            raise OutputError(f"{log.describe()}: two records of input line {line}{sample}")
        samples[line][index] = record["id"]
    return samples


class JobOutput:
    """The output directory of a job: what made it, its results and errors, and the input lines done.

    Every process of a multi-host job reads it and checks its run against it (`resume`); only the one that
    calls `start_writing` (after all have read) writes, and only while it holds `lock`.
    """

    def __init__(self, directory: str, *, part_records: int = 1000, part_seconds: float = 60.0,
                 lock: OutputLock | None = None):  # fmt: skip
        self.directory, self.lock = directory.rstrip("/"), lock
        self.results, self.errors = (
            open_log(directory, name, part_records=part_records, part_seconds=part_seconds)
            for name in (RESULTS, ERRORS)
        )
        self.result_samples = _samples_of(self.results)  # by line: the samples written, by index, with their id
        self.result_ids = {line: next(iter(samples.values())) for line, samples in self.result_samples.items()}
        self.error_lines = set(_samples_of(self.errors))
        self.made_by = Manifest.read(join(self.directory, MANIFEST_FILE))
        if self.made_by is None and (self.result_ids or self.error_lines):
            raise OutputError(f"{self.directory} holds records but no {MANIFEST_FILE}: it is not the output of "
                              "this version of gptoss-generate; choose another output")  # fmt: skip
        if both := sorted(self.error_lines & set(self.result_ids)):
            raise OutputError(f"{self.directory}: input line {both[0]} has both a result and an error")
        self.manifest = self.made_by
        self.retried: set[int] = set()

    def resume(self, manifest: Manifest, input_name: str, *, retry_errors: bool) -> None:
        """Checks that this run's settings and input (`manifest`) are those that made the output: OutputError
        naming the first setting or line that differs, except that with `retry_errors` a line without a result
        may differ. With `retry_errors`, the lines that ended in errors are not done."""
        if self.made_by is not None:
            self._check_settings(manifest.settings)
            self._check_lines(manifest.lines, input_name, retry_errors)
        self.manifest = manifest
        self.retried = self.error_lines if retry_errors else set()

    def _check_settings(self, settings: dict[str, Any]) -> None:
        for name in sorted(set(settings) | set(self.made_by.settings)):
            before, now = self.made_by.settings.get(name), settings.get(name)
            if before != now:
                raise OutputError(f"{self.directory} was made with {name}={before!r}, not {now!r}; "
                                  "run with the same settings, or choose another output")  # fmt: skip

    def _check_lines(self, lines: dict[int, str], input_name: str, retry_errors: bool) -> None:
        for number in sorted(set(lines) | set(self.made_by.lines)):
            if lines.get(number) == self.made_by.lines.get(number):
                continue
            where = f"{input_name}, line {number}, differs from the input that made {self.directory}"
            if number in self.result_ids:
                raise OutputError(f"{where}, which holds its result; choose another output")
            if not retry_errors:
                raise OutputError(f"{where}; if the line ended in an error and was edited since, set "
                                  "--config.retry_errors=true to run it again")  # fmt: skip

    @property
    def done_lines(self) -> set[int]:
        """The lines with an error not to retry, or with results (of a line of n samples, some may be missing)."""
        return set(self.result_ids) | (self.error_lines - self.retried)

    def is_done(self, line: int, samples: int) -> bool:
        """Whether input line `line`, of `samples` samples, has an error not to retry or all its results."""
        return line in self.error_lines - self.retried or len(self.result_samples.get(line, ())) >= samples

    @property
    def failed_before(self) -> int:
        return len(self.error_lines - self.retried)

    @property
    def result_lines(self) -> dict[str, int]:
        """The input line of each id that has a result."""
        return {record_id: line for line, record_id in self.result_ids.items()}

    def start_writing(self) -> None:
        """Makes this process the writer: drops the errors to retry, records what makes the output, and opens
        the logs for appending."""
        self.errors.drop(self.retried)
        if self.manifest != self.made_by:
            write_atomically(join(self.directory, MANIFEST_FILE), self.manifest.to_json())
        self.results.start_writing()
        self.errors.start_writing()

    def write_result(self, record: dict[str, Any]) -> None:
        self._check_lock()
        self.results.append(record)

    def write_error(self, record: dict[str, Any]) -> None:
        self._check_lock()
        self.errors.append(record)

    def _check_lock(self) -> None:
        if self.lock is not None:
            self.lock.check()

    def close(self) -> None:
        self.results.close()
        self.errors.close()

    def describe(self) -> str:
        return f"results {self.results.describe()}, errors {self.errors.describe()}"
