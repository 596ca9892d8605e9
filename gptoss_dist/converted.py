"""The converted checkpoint: every weight one tensorstore zarr3 array, in our layout, chunked for any mesh.

`gptoss-convert` (`gptoss_dist.convert`) writes it into a local directory or a `gs://` URL:

    config.json, tokenizer files   copied from the Hugging Face checkpoint
    arrays/<weight>/               one zarr3 array per weight, named by its parameter path
                                   (`arrays/layers.3.mlp.gate_up/`), in `model.py`'s shapes (already transposed)
    gptoss_progress.json           while a conversion runs: its plan and the arrays fully written so far
    gptoss_checkpoint.json         written last, once every array is: the completion marker, naming each array
                                   and whether the experts are packed

Packed experts (`gptoss-convert --packed_experts`): each expert weight is two uint8 arrays, its MXFP4 blocks
and scales exactly as the Hugging Face checkpoint stores them (`layers.3.mlp.gate_up_blocks`, `..._scales`).
Such a checkpoint loads only with `packed_experts=True`, and a dequantized one only without: restoring writes
each device's chunks straight into its shard, and the two layouts do not shard alike (a shard of dequantized
`down` may cut an MXFP4 group), so neither is turned into the other on load. The Hugging Face directory
loads either way.

Chunks. Each array has read chunks, the smallest piece a reader fetches, grouped into write chunks of up to
64 MiB, one object each (zarr3's sharding codec). Read chunks split every axis as finely as any mesh can: a
mesh axis must divide each dimension that `sharding.RULES` maps onto it, so its size divides the gcd of those
dimensions, and an array axis is never split more ways than the gcd of its size and the product of the
limits of its mesh axes. For GPT-OSS-20B that is one expert along `experts`, one head along the heads, 1/64
of the experts' intermediate dimension and 1/128 of the vocabulary. So whatever mesh a job picks, each
device's shard is a union of whole read chunks, and each process reads only the chunks its devices hold.
Every chunk is stored, zeros too, and a read of a chunk that is missing fails (as does one of a truncated or
corrupt chunk), naming the array and the elements read: a partial copy of a checkpoint never loads as zeros.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts
from flax import nnx

from gptoss_dist.checkpoint import CheckpointError
from gptoss_dist.paths import filesystem, is_local, join, write_atomically
from gptoss_dist.sharding import REPLICATE_IF_INDIVISIBLE, RULES

FORMAT = "gptoss-dist/zarr3/1"
MARKER_FILE = "gptoss_checkpoint.json"
PROGRESS_FILE = "gptoss_progress.json"
ARRAYS_DIR = "arrays"
WRITE_CHUNK_BYTES = 64 << 20
_CONTEXT = ts.Context()  # one set of connection pools and concurrency limits for every array


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """One stored array: its shape and dtype (our layout) and its read and write chunk shapes."""

    shape: tuple[int, ...]
    dtype: str
    read_chunk: tuple[int, ...]
    write_chunk: tuple[int, ...]

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> ArraySpec:
        return cls(**{k: v if k == "dtype" else tuple(v) for k, v in record.items()})

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def write_chunks(self, axis: int, span: range) -> Iterator[tuple[slice, ...]]:
        """Index boxes of the write chunks that cover `span` of `axis` (whole chunks) and every other axis."""
        starts = [range(0, dim, chunk) for dim, chunk in zip(self.shape, self.write_chunk, strict=True)]
        starts[axis] = range(span.start, span.stop, self.write_chunk[axis])
        for corner in itertools.product(*starts):
            yield tuple(slice(s, min(s + c, d)) for s, c, d in zip(corner, self.write_chunk, self.shape, strict=True))


def array_name(param: tuple[str | int, ...]) -> str:
    return ".".join(map(str, param))


def _mesh_axes(logical_axis: str | None) -> tuple[str, ...]:
    return (RULES[logical_axis] or ()) if logical_axis is not None else ()


def array_specs(state: nnx.State) -> dict[str, ArraySpec]:
    """How each parameter of an abstract model state is stored (see the module docstring for the chunks)."""
    weights = [
        (array_name(path), var.get_value().shape, np.dtype(var.get_value().dtype), var.get_metadata()["logical_axes"])
        for path, var in nnx.to_flat_state(state)
    ]
    limits: dict[str, int] = {}  # the largest size each mesh axis can take
    for _, shape, _, axes in weights:
        for logical_axis, dim in zip(axes, shape, strict=True):
            if logical_axis not in REPLICATE_IF_INDIVISIBLE:
                for mesh_axis in _mesh_axes(logical_axis):
                    limits[mesh_axis] = math.gcd(limits.get(mesh_axis, 0), dim)
    specs = {}
    for name, shape, dtype, axes in weights:
        splits = [math.gcd(dim, math.prod(limits[a] for a in _mesh_axes(ax))) for ax, dim in zip(axes, shape)]
        read_chunk = tuple(dim // split for dim, split in zip(shape, splits, strict=True))
        write_chunk = _group_chunks(shape, read_chunk, dtype.itemsize)
        specs[name] = ArraySpec(tuple(shape), dtype.name, read_chunk, write_chunk)
    return specs


def _group_chunks(shape: Sequence[int], read_chunk: Sequence[int], itemsize: int) -> tuple[int, ...]:
    """Read chunks grouped, last axis first, into a write chunk of at most WRITE_CHUNK_BYTES (or one read chunk)."""
    chunk = list(read_chunk)
    for axis in reversed(range(len(shape))):
        others = math.prod(chunk) // chunk[axis] * itemsize
        count = shape[axis] // read_chunk[axis]
        fits = [k for k in range(1, count + 1) if count % k == 0 and others * read_chunk[axis] * k <= WRITE_CHUNK_BYTES]
        chunk[axis] = read_chunk[axis] * max(fits, default=1)
        if chunk[axis] < shape[axis]:
            break
    return tuple(chunk)


# ------------------------------------------------------------------------------------------ arrays


def _kvstore(directory: str, name: str) -> str | dict[str, str]:
    url = join(directory, f"{ARRAYS_DIR}/{name}/")
    return {"driver": "file", "path": f"{Path(url).absolute()}/"} if is_local(url) else url


def create_array(directory: str, name: str, spec: ArraySpec) -> ts.TensorStore:
    """An empty array for `spec`, replacing whatever an earlier, interrupted conversion left there. Every chunk
    is stored, zeros too, so that a missing chunk is an error when read, never zeros."""
    layout = ts.ChunkLayout(read_chunk_shape=spec.read_chunk, write_chunk_shape=spec.write_chunk)
    return ts.open(
        {"driver": "zarr3", "kvstore": _kvstore(directory, name), "store_data_equal_to_fill_value": True},
        create=True, delete_existing=True, dtype=ts.dtype(spec.dtype), shape=spec.shape, chunk_layout=layout,
        context=_CONTEXT,
    ).result()  # fmt: skip


def open_array(directory: str, name: str, spec: ArraySpec) -> ts.TensorStore:
    """A converted array for reading: a chunk that is missing (say from a partial copy) fails its read."""
    try:
        return ts.open(
            {"driver": "zarr3", "kvstore": _kvstore(directory, name), "fill_missing_data_reads": False},
            open=True, read=True, dtype=ts.dtype(spec.dtype), shape=spec.shape, context=_CONTEXT,
        ).result()  # fmt: skip
    except ValueError as err:
        raise CheckpointError(f"{join(directory, ARRAYS_DIR)}/{name}: unreadable: {err}") from err


class InFlight:
    """Tensorstore futures in flight, at most `budget` bytes of them, finished in the order they were added."""

    def __init__(self, budget: int):
        self._budget, self._bytes = budget, 0
        self._queue: collections.deque[tuple[list, int, Callable[[], Any] | None, str | None]] = collections.deque()

    def add(
        self, futures: Sequence[Any], nbytes: int = 0, then: Callable[[], Any] | None = None, what: str | None = None
    ) -> None:
        """Adds futures; `then` runs once they, and everything added before them, have finished. If one fails,
        and `what` names what they read, CheckpointError names it."""
        self._queue.append((list(futures), nbytes, then, what))
        self._bytes += nbytes
        while self._queue and (self._bytes > self._budget or all(f.done() for f in self._queue[0][0])):
            self._finish_oldest()

    def drain(self) -> None:
        while self._queue:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        futures, nbytes, then, what = self._queue.popleft()
        try:
            for future in futures:
                future.result()
        except ValueError as err:  # tensorstore's: a chunk missing, truncated or corrupt
            if what is None:
                raise
            raise CheckpointError(f"{what}: {err}") from None
        self._bytes -= nbytes
        if then is not None:
            then()


# ------------------------------------------------------------------------- progress and completion


def _read_json(path: str) -> Any:
    try:
        return json.loads(filesystem(path).cat_file(path))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable: {err}") from err


def _write_json(path: str, record: Any) -> None:
    write_atomically(path, json.dumps(record).encode())


def specs_of(record: dict[str, Any]) -> dict[str, ArraySpec] | None:
    """The arrays a marker or progress record names; None for another format."""
    if record.get("format") != FORMAT:
        return None
    return {name: ArraySpec.from_json(spec) for name, spec in record["arrays"].items()}


class Conversion:
    """A conversion of `source` into `directory`: the arrays it writes (`specs`), those written so far
    (`done`), kept in the progress file until the completion marker replaces it.

    A directory with a progress file for the same source and plan resumes (`done` holds what it wrote); one
    with another, or any directory with `overwrite`, starts afresh. A complete checkpoint is refused without
    `overwrite`, and so is a non-empty directory that is not a converted checkpoint.
    """

    def __init__(
        self, directory: str | Path, specs: dict[str, ArraySpec], *, source: str, overwrite: bool,
        packed_experts: bool = False,
    ):  # fmt: skip
        self.directory, self.specs, self.source = str(directory).rstrip("/"), specs, source
        self.packed_experts = packed_experts
        self._fs = filesystem(self.directory)
        marker, progress = join(self.directory, MARKER_FILE), join(self.directory, PROGRESS_FILE)
        if self._fs.exists(marker) and not overwrite:
            raise CheckpointError(
                f"{self.directory}: already holds a complete converted checkpoint; pass --overwrite to replace it"
            )
        if not self._fs.exists(marker) and not self._fs.exists(progress) and self._holds_files():
            raise CheckpointError(f"{self.directory}: not empty and not a converted checkpoint; choose another --dst")
        previous = _read_json(progress) if self._fs.exists(progress) else {}
        # packed and dequantized experts name different arrays, so equal specs also mean the same packing
        resumable = not overwrite and previous.get("source") == source and specs_of(previous) == specs
        self.done: set[str] = set(previous["done"]) if resumable else set()
        self._fs.makedirs(self.directory, exist_ok=True)
        self._save()  # before the marker goes: the directory always holds one or the other
        if self._fs.exists(marker):
            self._fs.rm(marker)
        arrays = join(self.directory, ARRAYS_DIR)
        if not self.done and self._fs.exists(arrays):
            self._fs.rm(arrays, recursive=True)

    def _holds_files(self) -> bool:
        return self._fs.exists(self.directory) and bool(self._fs.ls(self.directory))

    def _plan(self) -> dict[str, Any]:
        arrays = {name: dataclasses.asdict(spec) for name, spec in self.specs.items()}
        return {"format": FORMAT, "source": self.source, "packed_experts": self.packed_experts, "arrays": arrays}

    def _save(self) -> None:
        _write_json(join(self.directory, PROGRESS_FILE), self._plan() | {"done": sorted(self.done)})

    def record(self, name: str) -> None:
        """Notes that every write of array `name` has landed."""
        self.done.add(name)
        self._save()

    def complete(self) -> None:
        """Marks the checkpoint complete; every array must be written."""
        if missing := sorted(set(self.specs) - self.done):
            raise CheckpointError(f"{self.directory}: arrays not written: {', '.join(missing[:8])}")
        _write_json(join(self.directory, MARKER_FILE), self._plan())
        self._fs.rm(join(self.directory, PROGRESS_FILE))


# ---------------------------------------------------------------------------------------- restore


def is_converted(path: str | Path) -> bool:
    """Whether `path` holds a converted checkpoint, complete or not (else it is in the Hugging Face layout)."""
    fs = filesystem(path)
    return any(fs.exists(join(path, file)) for file in (MARKER_FILE, PROGRESS_FILE))


def read_specs(directory: str) -> dict[str, ArraySpec]:
    """The arrays of a complete converted checkpoint; refuses an incomplete one."""
    return specs_of(read_marker(directory))


def read_marker(directory: str) -> dict[str, Any]:
    """The completion marker of a complete converted checkpoint; refuses an incomplete one or another format."""
    marker = join(directory, MARKER_FILE)
    if not filesystem(marker).exists(marker):
        progress = _read_json(join(directory, PROGRESS_FILE))
        raise CheckpointError(
            f"{directory}: an incomplete converted checkpoint ({len(progress['done'])} of "
            f"{len(progress['arrays'])} arrays written, no {MARKER_FILE}); run gptoss-convert again to finish it"
        )
    record = _read_json(marker)
    if record.get("format") != FORMAT:
        raise CheckpointError(f"{marker}: format {record.get('format')!r}, expected {FORMAT!r}")
    return record


def check_packing(directory: str, record: dict[str, Any], packed_experts: bool) -> None:
    """Refuses to load a converted checkpoint's experts in the other layout (see the module docstring)."""
    if record.get("packed_experts", False) == packed_experts:  # absent: converted before packed experts
        return
    if packed_experts:
        raise CheckpointError(
            f"{directory}: converted with dequantized experts, it holds no MXFP4 blocks; load it with "
            "packed_experts=False, or convert the Hugging Face checkpoint again with --packed_experts"
        )
    raise CheckpointError(
        f"{directory}: converted with packed (MXFP4) experts; load it with packed_experts=True, or convert the "
        "Hugging Face checkpoint again without --packed_experts"
    )


def check_arrays(directory: str, stored: dict[str, ArraySpec], state: nnx.State) -> None:
    expected = {array_name(path): tuple(var.get_value().shape) for path, var in nnx.to_flat_state(state)}
    if names := sorted(set(expected) ^ set(stored)):
        marker = join(directory, MARKER_FILE)
        raise CheckpointError(f"{marker}: arrays differ from those config.json implies: {', '.join(names[:8])}")
    for name, shape in expected.items():
        if stored[name].shape != shape:
            raise CheckpointError(
                f"{join(directory, MARKER_FILE)}: array {name} has shape {stored[name].shape}, "
                f"but config.json implies {shape}"
            )
