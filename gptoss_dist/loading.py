"""`from_pretrained`: a model from a checkpoint directory in either format, the published Hugging Face layout
(`gptoss_dist.checkpoint`) or converted by `gptoss-convert` into an orbax checkpoint (`gptoss_dist.converted`),
local or on `gs://`.

One skeleton fills every parameter, shard by shard, straight into its sharding; a source per format reads the
shards. Each process reads only the shards its devices hold, and replicated shards once. `HfSource` reads a
shard's rows of the checkpoint's tensor a block at a time (MXFP4 experts decoded a block at a time), so the
host holds one shard and one block of float32, not the tensor. `ConvertedSource` starts tensorstore reads of
each shard's chunks, several parameters ahead, up to READ_AHEAD_BYTES.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental.layout import Format
from jax.sharding import SingleDeviceSharding

from gptoss_dist import converted
from gptoss_dist.checkpoint import (
    READ_BLOCK_BYTES,
    HfCheckpoint,
    check_names,
    check_shapes,
    hf_tensors,
    read_box,
    read_config,
)
from gptoss_dist.config import ModelConfig
from gptoss_dist.model import GptOss, abstract_model
from gptoss_dist.paths import join
from gptoss_dist.sharding import param_formats

READ_AHEAD_BYTES = 1 << 30  # a converted checkpoint: bytes of reads in flight
Box = tuple[slice, ...]  # the elements of one shard, each slice with a start and a stop


@dataclasses.dataclass(frozen=True)
class ShardRead:
    """A read of one shard: the tensorstore futures it waits on (none for a read done on demand), their bytes,
    what they read (for an error), and the shard's values once they are done."""

    futures: Sequence[Any]
    nbytes: int
    what: str | None
    values: Callable[[], np.ndarray]


class Source(Protocol):
    config: ModelConfig

    def check(self, state: nnx.State) -> None:
        """Refuses a checkpoint whose weights differ from those of the abstract model `state`."""

    def start_read(self, param: tuple, shape: tuple[int, ...], box: Box, dtype: np.dtype) -> ShardRead:
        """Starts reading the elements `box` of parameter `param` (of `shape`), as `dtype`."""


class HfSource:
    """The shards of a Hugging Face checkpoint, each read on demand."""

    def __init__(self, directory: str | Path, *, packed_experts: bool, read_block_bytes: int):
        self._ckpt = HfCheckpoint(directory, read_block_bytes=read_block_bytes)
        self.config = self._ckpt.config()
        self._tensors = {tensor.param: tensor for tensor in hf_tensors(self.config, packed_experts=packed_experts)}

    def check(self, state: nnx.State) -> None:
        """Every name and shape against config.json, from which `state` is built too."""
        check_names(self._ckpt, list(self._tensors.values()))
        for tensor in self._tensors.values():
            check_shapes(self._ckpt, tensor)

    def start_read(self, param: tuple, shape: tuple[int, ...], box: Box, dtype: np.dtype) -> ShardRead:
        read = functools.partial(read_box, self._ckpt, self._tensors[param], shape, box, dtype)
        return ShardRead((), 0, None, read)


class ConvertedSource:
    """The shards of a converted checkpoint, each a tensorstore read of its chunks."""

    def __init__(self, directory: str | Path, *, packed_experts: bool):
        self._directory = str(directory).rstrip("/")
        plan = converted.read_plan(self._directory)
        converted.check_packing(self._directory, plan, packed_experts)
        self._specs = converted.specs_of(plan)
        self.config = read_config(self._directory)
        self._open: tuple[str, Any] | None = None  # one array open at a time: its shards are read in turn

    def check(self, state: nnx.State) -> None:
        converted.check_arrays(self._directory, self._specs, state)

    def _array(self, name: str) -> Any:
        if self._open is None or self._open[0] != name:
            self._open = (name, converted.open_array(self._directory, name, self._specs[name]))
        return self._open[1]

    def start_read(self, param: tuple, shape: tuple[int, ...], box: Box, dtype: np.dtype) -> ShardRead:
        name = converted.array_name(param)
        future = self._array(name)[box].read()
        elements = ", ".join(f"{part.start}:{part.stop}" for part in box)
        where = f"{join(self._directory, name)}, elements [{elements}]"
        nbytes = math.prod(part.stop - part.start for part in box) * np.dtype(self._specs[name].dtype).itemsize
        return ShardRead((future,), nbytes, where, lambda: future.result().astype(dtype, copy=False))


def open_source(path: str | Path, *, packed_experts: bool, read_block_bytes: int = READ_BLOCK_BYTES) -> Source:
    """The source of a checkpoint directory in either format (`read_block_bytes`: a Hugging Face one's)."""
    if converted.is_converted(path):
        return ConvertedSource(path, packed_experts=packed_experts)
    return HfSource(path, packed_experts=packed_experts, read_block_bytes=read_block_bytes)


def shard_boxes(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> list[tuple[Box, list[jax.Device]]]:
    """The shards this process's devices hold, each with the devices that hold it."""
    boxes: dict[tuple, tuple[Box, list[jax.Device]]] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        bounds = tuple(part.indices(dim)[:2] for part, dim in zip(index, shape, strict=True))
        boxes.setdefault(bounds, (tuple(slice(*bound) for bound in bounds), []))[1].append(device)
    return list(boxes.values())


def fill(state: nnx.State, formats: dict[tuple, Format], source: Source) -> None:
    """Sets every parameter of the abstract `state` from `source`, each shard read once and put on its devices
    in the parameter's sharding and layout (`formats`)."""
    in_flight = converted.InFlight(READ_AHEAD_BYTES)
    for param, var in nnx.to_flat_state(state):
        shape, dtype = var.get_value().shape, np.dtype(var.get_value().dtype)
        boxes = shard_boxes(formats[param].sharding, shape)
        reads = [(source.start_read(param, shape, box, dtype), devices) for box, devices in boxes]
        for read, _ in reads:
            in_flight.add(read.futures, read.nbytes, what=read.what)
        in_flight.add([], then=functools.partial(_place, var, formats[param], reads))
    in_flight.drain()


def _place(var: nnx.Variable, target: Format, reads: list[tuple[ShardRead, list[jax.Device]]]) -> None:
    """Puts each shard on its devices, in the target's layout, as it is read, so that the host holds one shard
    at a time."""
    shards = []
    for read, devices in reads:
        values = read.values()
        shards += [jax.device_put(values, Format(target.layout, SingleDeviceSharding(device))) for device in devices]
        del values
    var.set_value(jax.make_array_from_single_device_arrays(var.get_value().shape, target.sharding, shards))


def from_pretrained(
    path: str | Path,
    *,
    dtype=jnp.bfloat16,
    compute_dtype=None,
    mesh: jax.sharding.Mesh | None = None,
    packed_experts: bool = False,
    experts_implementation: str = "auto",
    read_block_bytes: int = READ_BLOCK_BYTES,
) -> GptOss:
    """Loads a model from a checkpoint directory in the published Hugging Face layout, or converted by
    `gptoss-convert`; either may be local or on `gs://`.

    `dtype` is the parameters' dtype (bfloat16 for serving, float32 for parity); `compute_dtype` defaults to
    it. With a `mesh`, each weight goes straight into its sharding (run the model under `jax.set_mesh(mesh)`);
    without, onto the default device. With `packed_experts` the expert weights stay MXFP4 (uint8 blocks and
    scales, copied as the checkpoint stores them); the checkpoint must store them so.
    `experts_implementation` names how the experts run (`model.EXPERTS_IMPLEMENTATIONS`). From a Hugging Face
    directory, weights are read in row blocks of about `read_block_bytes` (counted in float32): the host's
    memory while loading holds one block and one shard.
    """
    source = open_source(path, packed_experts=packed_experts, read_block_bytes=read_block_bytes)
    model = abstract_model(source.config, dtype=dtype, compute_dtype=compute_dtype, packed_experts=packed_experts,
                           experts_implementation=experts_implementation)  # fmt: skip
    graphdef, state = nnx.split(model)
    source.check(state)
    if mesh is not None:
        formats = dict(nnx.to_flat_state(param_formats(state, mesh)))
    else:
        one_device = Format(None, SingleDeviceSharding(jax.devices()[0]))
        formats = {param: one_device for param, _ in nnx.to_flat_state(state)}
    fill(state, formats, source)
    return nnx.merge(graphdef, state)
