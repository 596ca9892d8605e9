"""JSONL files for the batch job, on local disk or in an object store (`gs://`), and exactly-once output.

Input is read as numbered lines, streaming, through fsspec (gcsfs, imported by fsspec only for `gs://`).

Output is a directory with two record logs, `results` and `errors`. Each record is one JSON object on one line,
and a log reads back the records it already holds, so a job that is killed and started again skips what is
done (`JobOutput`) and every record lands exactly once, whole:

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
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import fsspec

RESULTS, ERRORS = "results", "errors"


class InputError(Exception):
    """The input file cannot be read."""


def is_local(url: str) -> bool:
    return fsspec.utils.get_protocol(url) in ("file", "local")


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


def count_lines(url: str) -> int:
    """Lines of `url` that are not blank."""
    return sum(1 for _ in read_lines(url))


# ----------------------------------------------------------------------------------------------- output


class OutputError(Exception):
    """The output directory holds something that is not a job's records."""


def _parse_lines(lines: Iterable[bytes], where: str) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(lines, start=1):
        try:
            yield json.loads(line)
        except ValueError as err:
            raise OutputError(f"{where}, line {number}: not a JSON record ({err}); is this a job's output?") from None


def _json_line(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, ensure_ascii=False) + "\n").encode()


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

    def existing(self) -> Iterator[dict[str, Any]]:
        """The records written so far (a trailing partial line, a write a kill cut off, is not one)."""
        if not self.path.exists():
            return
        with self.path.open("rb") as file:
            yield from _parse_lines((line for line in file if line.endswith(b"\n")), str(self.path))

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
        self._parts = sorted(self.fs.glob(posixpath.join(root, f"{name}-*.jsonl")))
        numbers = [re.fullmatch(rf"{name}-(\d+)\.jsonl", posixpath.basename(part)) for part in self._parts]
        self._next_part = 1 + max((int(match[1]) for match in numbers if match), default=-1)
        self._waiting: list[bytes] = []
        self._oldest = 0.0
        self._writing = False

    def existing(self) -> Iterator[dict[str, Any]]:
        """The records of the parts there were when this log was opened."""
        for part in self._parts:
            yield from _parse_lines(self.fs.cat_file(part).splitlines(), part)

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


class JobOutput:
    """The results and errors of a job, and what an earlier run of it already did.

    A request counts as done once its result is written (by `id`); an input line, once an error names it
    (by `line`, since a bad line may have no id). Every process of a multi-host job reads what is done; only
    the one that calls `start_writing` (after all have read) writes.
    """

    def __init__(self, directory: str, *, part_records: int = 1000, part_seconds: float = 60.0):
        self.results, self.errors = (
            open_log(directory, name, part_records=part_records, part_seconds=part_seconds)
            for name in (RESULTS, ERRORS)
        )
        self.done_ids = {record["id"] for record in self.results.existing()}
        self.done_lines = {record["line"] for record in self.errors.existing()}
        self.failed_before = len(self.done_lines)

    def start_writing(self) -> None:
        self.results.start_writing()
        self.errors.start_writing()

    def close(self) -> None:
        self.results.close()
        self.errors.close()

    def describe(self) -> str:
        return f"results {self.results.describe()}, errors {self.errors.describe()}"
