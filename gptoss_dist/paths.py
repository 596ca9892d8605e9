"""Local paths and `gs://` URLs alike: their filesystem, joining a name on, whether one is local, atomic writes."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import fsspec


def is_local(path: str | Path) -> bool:
    """Whether `path` is on local disk (a plain path or a `file://` URL), not in an object store."""
    return fsspec.utils.get_protocol(str(path)) in ("file", "local")


def filesystem(path: str | Path) -> fsspec.AbstractFileSystem:
    """The filesystem of a local path or a `gs://` URL (fsspec imports gcsfs only for the latter)."""
    return fsspec.core.url_to_fs(str(path))[0]


def join(directory: str | Path, name: str) -> str:
    """`directory/name` for a local path or a URL."""
    return f"{str(directory).rstrip('/')}/{name}"


def write_atomically(path: str, data: bytes, *, create: bool = False) -> None:
    """Writes `path` whole or not at all: a local file is renamed (or, with `create`, linked) into place, an
    object is uploaded in one request. With `create`, only if `path` does not exist yet: FileExistsError if it
    does (an object store checks that through a generation precondition)."""
    fs, local_path = fsspec.core.url_to_fs(path)
    if not is_local(path):
        fs.pipe_file(path, data, mode="create" if create else "overwrite")
        return
    target = Path(local_path)
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        with temporary.open("xb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        (os.link if create else os.replace)(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
