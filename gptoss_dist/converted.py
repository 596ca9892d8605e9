"""The converted checkpoint: an orbax checkpoint (orbax's PyTree layout, one zarr3 array per weight, no OCDBT),
chunked for any mesh, that `gptoss-convert` (`gptoss_dist.convert`) writes into a local directory or a `gs://` URL:

    config.json, tokenizer files   copied from the Hugging Face checkpoint
    <weight>/                      one zarr3 array per weight, named as orbax names a leaf, by its path in the
                                   model's state joined with dots (`layers.3.mlp.gate_up/`), in `model.py`'s shapes
    _METADATA                      orbax's tree metadata: the nested dict of weights, zarr3, no OCDBT; its
                                   `custom_metadata["gptoss_dist"]` records each array's shape, dtype and chunks,
                                   the source and whether the experts are packed
    _CHECKPOINT_METADATA           orbax's, written by orbax when the conversion starts and when it commits
    commit_success.txt             orbax's commit file

Plain orbax restores it: `orbax.checkpoint.StandardCheckpointer().restore(path, target)`, or orbax's v1
`load_pytree(path, target)`, with `target` the nested dict of `jax.ShapeDtypeStruct`s (with their shardings)
of the model's state (`nnx.to_pure_dict(nnx.state(model))`, or the tree of
`StandardCheckpointer().metadata(path)`); each process reads only the chunks of its shards. `from_pretrained`
reads the same arrays with tensorstore, in the skeleton it shares with the Hugging Face layout.

What orbax does, and what is done beside it where orbax cannot:
- The commit is orbax's, made by orbax's own code (`orbax.checkpoint.path.atomicity`): a conversion writes
  into orbax's temporary directory for the destination (locally `<dst>.orbax-checkpoint-tmp`, renamed to
  `<dst>` to commit; on `gs://`, `<dst>` itself, committed by writing `commit_success.txt`). The loader checks
  the commit as orbax does (`validate_final`) and refuses a checkpoint without it, naming the path.
- Streaming with bounded memory: orbax saves whole in-memory arrays (its partial save too: a whole leaf at a
  time), so tensorstore writes each array a block at a time, in the layout orbax itself writes with
  `use_ocdbt=False, use_zarr3=True` (zarr3 sharding codec, one object per write chunk); orbax reads any zarr3
  chunking. orbax has no public callable for `_METADATA`, so it is written to orbax's schema here
  (`tree_metadata`), pinned by a test that restores with plain orbax.
- Resume: orbax discards an unfinished temporary directory (its partial save cannot be read back either).
  Ours holds `gptoss_progress.json` (the plan and the arrays fully written), and a rerun with the same source
  and plan continues there; the file goes once the checkpoint is committed.
- Not written: orbax's `_sharding` and `array_metadatas/` (the shardings of the save): a conversion has no
  mesh, and a restore given target shardings does not read them.
- Multi-host: a conversion runs in one process; restore reads only each process's chunks either way.
- The previous format (`gptoss-dist/zarr3/1`, arrays under `arrays/` and a `gptoss_checkpoint.json` marker)
  has no reader: convert the Hugging Face checkpoint again.

Packed experts (`gptoss-convert --packed_experts`): each expert weight is two uint8 arrays, its MXFP4 blocks
and scales exactly as the Hugging Face checkpoint stores them (`layers.3.mlp.gate_up_blocks`, `..._scales`).
Such a checkpoint loads only with `packed_experts=True`, and a dequantized one only without: restoring writes
each device's chunks straight into its shard, and the two layouts do not shard alike (a shard of dequantized
`down` may cut an MXFP4 group), so neither is turned into the other on load. The Hugging Face directory
loads either way.

Chunks. Each array has read chunks, the smallest piece a reader fetches, grouped into write chunks of up to
`write_chunk_bytes` (64 MiB by default), one object each (zarr3's sharding codec). Read chunks split every
axis as finely as any mesh can: a mesh axis must divide each dimension that `sharding.RULES` maps onto it, so its size divides the gcd of those
dimensions, and an array axis is never split more ways than the gcd of its size and the product of the
limits of its mesh axes. For GPT-OSS-20B that is one expert along `experts`, one head along the heads, 1/64
of the experts' intermediate dimension and 1/128 of the vocabulary. So whatever mesh a job picks, each
device's shard is a union of whole read chunks, and each process reads only the chunks its devices hold.
Every chunk is stored, zeros too, and a read of a chunk that is missing fails (as does one of a truncated or
corrupt chunk), naming the array and the elements read: a partial copy of a checkpoint never loads as zeros.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from flax import nnx

from gptoss_dist.checkpoint import CheckpointError
from gptoss_dist.paths import filesystem, is_local, join, write_atomically
from gptoss_dist.sharding import REPLICATE_IF_INDIVISIBLE, RULES

FORMAT = "gptoss-dist/orbax/1"  # in _METADATA's custom metadata: how the arrays are named, chunked and packed
CUSTOM_METADATA_KEY = "gptoss_dist"
METADATA_FILE = ocp.path.format_utils.PYTREE_METADATA_FILE
PROGRESS_FILE = "gptoss_progress.json"
WRITE_CHUNK_BYTES = 64 << 20
_DICT_KEY = 2  # orbax's KeyType.DICT: every level of the tree is a dict
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


def array_specs(state: nnx.State, write_chunk_bytes: int = WRITE_CHUNK_BYTES) -> dict[str, ArraySpec]:
    """How each parameter of an abstract model state is stored: read chunks fine enough for any mesh, grouped
    into write chunks of at most `write_chunk_bytes` (see the module docstring)."""
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
        write_chunk = _group_chunks(shape, read_chunk, dtype.itemsize, write_chunk_bytes)
        specs[name] = ArraySpec(tuple(shape), dtype.name, read_chunk, write_chunk)
    return specs


def _group_chunks(shape: Sequence[int], read_chunk: Sequence[int], itemsize: int, limit: int) -> tuple[int, ...]:
    """Read chunks grouped, last axis first, into a write chunk of at most `limit` bytes (or one read chunk)."""
    chunk = list(read_chunk)
    for axis in reversed(range(len(shape))):
        others = math.prod(chunk) // chunk[axis] * itemsize
        count = shape[axis] // read_chunk[axis]
        fits = [k for k in range(1, count + 1) if count % k == 0 and others * read_chunk[axis] * k <= limit]
        chunk[axis] = read_chunk[axis] * max(fits, default=1)
        if chunk[axis] < shape[axis]:
            break
    return tuple(chunk)


# ------------------------------------------------------------------------------------------ arrays


def _kvstore(directory: str, name: str) -> str | dict[str, str]:
    url = join(directory, f"{name}/")
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
        raise CheckpointError(f"{join(directory, name)}: unreadable: {err}") from err


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


# ------------------------------------------------------------------------------- orbax's metadata and commit


def _read_json(path: str) -> Any:
    try:
        return json.loads(filesystem(path).cat_file(path))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable: {err}") from err


def _write_json(path: str, record: Any) -> None:
    write_atomically(path, json.dumps(record).encode())


def tree_metadata(specs: dict[str, ArraySpec], custom_metadata: dict[str, Any]) -> dict[str, Any]:
    """orbax's `_METADATA` for the arrays `specs`: a nested dict of `jax.Array` leaves, one zarr3 array each
    (no OCDBT), named by their paths; `custom_metadata` rides along as orbax's custom metadata."""
    tree = {}
    for name, spec in specs.items():
        keys = name.split(".")
        tree[str(tuple(keys))] = {
            "key_metadata": [{"key": key, "key_type": _DICT_KEY} for key in keys],
            "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False, "write_shape": list(spec.write_chunk)},
        }  # fmt: skip
    return {
        "tree_metadata": tree, "use_ocdbt": False, "use_zarr3": True, "store_array_data_equal_to_fill_value": True,
        "custom_metadata": custom_metadata,
    }  # fmt: skip


def _temporary_path(directory: str, *, writing: bool = False) -> ocp.path.atomicity_types.TemporaryPath:
    """orbax's temporary path for a checkpoint at `directory`: where it is written, and how it is committed
    (locally a rename, on `gs://` a commit file); `writing`, with orbax's `_CHECKPOINT_METADATA` kept."""
    final = epath.Path(directory)
    store = ocp.metadata.metadata_store(enable_write=True, blocking_write=True) if writing else None
    kind = ocp.path.atomicity_defaults.get_default_temporary_path_class(final)
    return kind.from_final(final, checkpoint_metadata_store=store)


def working_directory(directory: str | Path) -> str:
    """Where a conversion into `directory` writes until orbax's commit (locally `<directory>` plus orbax's
    temporary suffix; on `gs://`, `directory` itself)."""
    return str(_temporary_path(str(directory).rstrip("/")).get())


def _uncommitted(directory: str) -> str | None:
    """Why `directory` is not a committed orbax checkpoint (orbax's own check), or None where it is."""
    try:
        asyncio.run(type(_temporary_path(directory)).validate_final(epath.Path(directory)))
    except ocp.path.atomicity_types.ValidationError as err:
        return str(err)
    return None


def specs_of(record: dict[str, Any]) -> dict[str, ArraySpec] | None:
    """The arrays a plan (progress file or custom metadata) names; None for another format."""
    if record.get("format") != FORMAT:
        return None
    return {name: ArraySpec.from_json(spec) for name, spec in record["arrays"].items()}


class Conversion:
    """A conversion of `source` into `directory`: the arrays it writes (`specs`) into orbax's temporary
    directory (`working`), those written so far (`done`), kept in the progress file there until orbax's commit.

    A temporary directory whose progress file has the same source and plan resumes (`done` holds what it
    wrote); any other, or any with `overwrite`, starts afresh, through orbax (which clears it). A committed
    checkpoint is refused without `overwrite`, and so is a non-empty directory that is not a converted
    checkpoint.
    """

    def __init__(
        self, directory: str | Path, specs: dict[str, ArraySpec], *, source: str, overwrite: bool,
        packed_experts: bool = False,
    ):  # fmt: skip
        self.directory, self.specs, self.source = str(directory).rstrip("/"), specs, source
        self.packed_experts = packed_experts
        self._commit = _temporary_path(self.directory, writing=True)
        self.working = str(self._commit.get())
        self._fs = filesystem(self.directory)
        progress = join(self.working, PROGRESS_FILE)
        previous = _read_json(progress) if self._fs.exists(progress) else {}
        if is_committed(self.directory):
            if not overwrite:
                raise CheckpointError(
                    f"{self.directory}: already holds a complete converted checkpoint; pass --overwrite to replace it"
                )
            self._fs.rm(self.directory, recursive=True)
        elif self._holds_files() and not (previous and self.working == self.directory):  # gs://: written in place
            raise CheckpointError(f"{self.directory}: not empty and not a converted checkpoint; choose another --dst")
        # packed and dequantized experts name different arrays, so equal specs also mean the same packing
        resumable = not overwrite and previous.get("source") == source and specs_of(previous) == specs
        self.done: set[str] = set(previous["done"]) if resumable else set()
        if not resumable:
            asyncio.run(self._commit.create())  # orbax's: clears the directory, writes _CHECKPOINT_METADATA
        self._save()

    def _holds_files(self) -> bool:
        return self._fs.exists(self.directory) and bool(self._fs.ls(self.directory))

    def _plan(self) -> dict[str, Any]:
        arrays = {name: dataclasses.asdict(spec) for name, spec in self.specs.items()}
        return {"format": FORMAT, "source": self.source, "packed_experts": self.packed_experts, "arrays": arrays}

    def _save(self) -> None:
        _write_json(join(self.working, PROGRESS_FILE), self._plan() | {"done": sorted(self.done)})

    def record(self, name: str) -> None:
        """Notes that every write of array `name` has landed."""
        self.done.add(name)
        self._save()

    def complete(self) -> None:
        """Writes orbax's tree metadata and commits the checkpoint, through orbax; every array must be written."""
        if missing := sorted(set(self.specs) - self.done):
            raise CheckpointError(f"{self.directory}: arrays not written: {', '.join(missing[:8])}")
        _write_json(join(self.working, METADATA_FILE), tree_metadata(self.specs, {CUSTOM_METADATA_KEY: self._plan()}))
        asyncio.run(self._commit.finalize())
        self._fs.rm(join(self.directory, PROGRESS_FILE))


# ---------------------------------------------------------------------------------------- restore


def is_committed(directory: str | Path) -> bool:
    """Whether `directory` holds a committed orbax checkpoint."""
    directory = str(directory).rstrip("/")
    return filesystem(directory).exists(join(directory, METADATA_FILE)) and _uncommitted(directory) is None


def is_converted(path: str | Path) -> bool:
    """Whether `path` holds an orbax checkpoint or a conversion into it has begun, committed or not (else it is
    in the Hugging Face layout)."""
    fs = filesystem(path)
    places = (str(path).rstrip("/"), working_directory(path))
    return any(fs.exists(join(place, file)) for place in places for file in (METADATA_FILE, PROGRESS_FILE))


def read_plan(directory: str) -> dict[str, Any]:
    """What a committed converted checkpoint holds (its custom metadata); refuses a checkpoint without orbax's
    commit, or one that `gptoss-convert` did not write."""
    if reason := _uncommitted(directory):
        progress, written = join(working_directory(directory), PROGRESS_FILE), ""
        if filesystem(progress).exists(progress):
            record = _read_json(progress)
            written = f"{len(record['done'])} of {len(record['arrays'])} arrays written; "
        raise CheckpointError(
            f"{directory}: a converted checkpoint without orbax's commit ({written}{reason}); run gptoss-convert "
            "again to finish it"
        )
    metadata = join(directory, METADATA_FILE)
    plan = (_read_json(metadata).get("custom_metadata") or {}).get(CUSTOM_METADATA_KEY, {})
    if plan.get("format") != FORMAT:
        raise CheckpointError(
            f"{metadata}: an orbax checkpoint that gptoss-convert did not write (custom metadata "
            f"{CUSTOM_METADATA_KEY!r} of format {plan.get('format')!r}, expected {FORMAT!r}); convert the Hugging "
            "Face checkpoint with gptoss-convert"
        )
    return plan


def check_packing(directory: str, plan: dict[str, Any], packed_experts: bool) -> None:
    """Refuses to load a converted checkpoint's experts in the other layout (see the module docstring)."""
    if plan["packed_experts"] == packed_experts:
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
    metadata = join(directory, METADATA_FILE)
    expected = {array_name(path): tuple(var.get_value().shape) for path, var in nnx.to_flat_state(state)}
    if names := sorted(set(expected) ^ set(stored)):
        raise CheckpointError(f"{metadata}: arrays differ from those config.json implies: {', '.join(names[:8])}")
    for name, shape in expected.items():
        if stored[name].shape != shape:
            raise CheckpointError(
                f"{metadata}: array {name} has shape {stored[name].shape}, but config.json implies {shape}"
            )
