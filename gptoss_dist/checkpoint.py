"""The published Hugging Face checkpoint layout: reading it tensor by tensor, or a box of a tensor in our layout.

A checkpoint directory holds `config.json`, one or several `*.safetensors` files and, when there are several,
`model.safetensors.index.json`. Expert weights are stored either as MXFP4 (`<name>_blocks`, `<name>_scales`,
as openai/gpt-oss-* publish them) or dequantized (`<name>`, as transformers saves them). MXFP4 experts are
decoded a block of rows at a time (`read_row_blocks`), or with `packed_experts` copied as stored. The directory is a local path (tensors are
memory-mapped) or a `gs://` URL (each tensor is one byte-range read, through gcsfs).
"""

from __future__ import annotations

import dataclasses
import json
import math
import posixpath
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from gptoss_dist import mxfp4
from gptoss_dist.config import ConfigError, ModelConfig
from gptoss_dist.paths import filesystem, is_local, join

INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip
PACKED_SUFFIXES = ("_blocks", "_scales")
READ_BLOCK_BYTES = 128 << 20  # rows read at a time, counted in float32 (MXFP4 decodes to it)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: the message names the file or the tensor."""


def read_config(directory: str | Path) -> ModelConfig:
    """The model config of a checkpoint directory: its `config.json`."""
    path = join(directory, CONFIG_FILE)
    fs = filesystem(path)
    if not fs.exists(path):
        raise CheckpointError(f"{path}: missing")
    try:
        return ModelConfig.from_hf_dict(json.loads(fs.cat_file(path)))
    except (json.JSONDecodeError, UnicodeDecodeError, ConfigError) as err:
        raise CheckpointError(f"{path}: {err}") from err


class SafetensorsFile:
    """One `.safetensors` file, read lazily: `read(name)` reads only that tensor's bytes (or some of its rows).

    (safetensors' own numpy reader has no bfloat16, the dtype of every non-expert GPT-OSS weight.)
    """

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._fs = filesystem(path)
        try:
            size = self._fs.size(self.path)
            (header_len,) = struct.unpack("<Q", self._fs.cat_file(self.path, 0, 8))
            if header_len > size - 8:
                raise CheckpointError(f"{path}: truncated: the header claims {header_len} bytes")
            header = json.loads(self._fs.cat_file(self.path, 8, 8 + header_len))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file: {err}") from err
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self.tensors: dict[str, dict[str, Any]] = header
        data_end = max((info["data_offsets"][1] for info in header.values()), default=0)
        if self._data_start + data_end > size:
            raise CheckpointError(
                f"{path}: truncated: its header describes {self._data_start + data_end} bytes, the file has {size}"
            )

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name]["shape"])

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        """The tensor `name`, or only `rows` (a slice with start and stop) of its first axis."""
        info = self.tensors[name]
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        dtype = np.dtype(_DTYPES[info["dtype"]])
        shape = tuple(info["shape"])
        if end - begin != dtype.itemsize * math.prod(shape):
            raise CheckpointError(f"{self.path}: tensor {name}: {end - begin} bytes do not hold {shape} {dtype}")
        offset = self._data_start + begin
        if rows is not None:
            offset += rows.start * (end - begin) // shape[0]
            shape = (rows.stop - rows.start, *shape[1:])
        if is_local(self.path):
            return np.array(np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=shape))
        data = self._fs.cat_file(self.path, offset, offset + dtype.itemsize * math.prod(shape))
        return np.frombuffer(data, dtype).reshape(shape)


class HfCheckpoint:
    """The tensors of a Hugging Face checkpoint directory (a local path or a `gs://` URL), by name, each
    read on demand; weights read in row blocks (`read_row_blocks`) of about `read_block_bytes` counted in
    float32."""

    def __init__(self, directory: str | Path, *, read_block_bytes: int = READ_BLOCK_BYTES):
        self.directory = str(directory).rstrip("/")
        self.read_block_bytes = read_block_bytes
        self._fs = filesystem(self.directory)
        if not self._fs.isdir(self.directory):
            raise CheckpointError(f"{self.directory}: no such checkpoint directory")
        self._file_of = self._locate_tensors()
        self._files: dict[str, SafetensorsFile] = {}

    def _locate_tensors(self) -> dict[str, str]:
        index = join(self.directory, INDEX_FILE)
        if self._fs.exists(index):
            try:
                weight_map = json.loads(self._fs.cat_file(index))["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError) as err:
                raise CheckpointError(f"{index}: not a safetensors index: {err}") from err
            for file in sorted(set(weight_map.values())):
                if not self._fs.exists(join(self.directory, file)):
                    raise CheckpointError(f"{join(self.directory, file)}: missing, but {INDEX_FILE} lists it")
            return dict(weight_map)
        files = sorted(posixpath.basename(path) for path in self._fs.glob(join(self.directory, "*.safetensors")))
        if not files:
            raise CheckpointError(f"{self.directory}: holds no .safetensors file")
        return {name: file for file in files for name in SafetensorsFile(join(self.directory, file)).tensors}

    def _file(self, name: str) -> SafetensorsFile:
        file = self._file_of[name]
        if file not in self._files:
            self._files[file] = SafetensorsFile(join(self.directory, file))
        handle = self._files[file]
        if name not in handle.tensors:
            raise CheckpointError(f"{handle.path}: has no tensor {name}, but {INDEX_FILE} places it there")
        return handle

    def names(self) -> set[str]:
        return set(self._file_of)

    def where(self, name: str) -> str:
        return join(self.directory, self._file_of[name])

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        return self._file(name).read(name, rows)

    def config(self) -> ModelConfig:
        return read_config(self.directory)


@dataclasses.dataclass(frozen=True)
class HfTensor:
    """One model weight as the checkpoint stores it.

    `shape` is its Hugging Face (transformers) shape; `transpose` reorders those axes into ours before a
    reshape to the parameter's shape; `mxfp4` marks expert weights that may be stored packed. A weight kept
    packed on the device is two of these, its MXFP4 blocks and scales, each naming in `part_of` the expert
    weight it is part of.
    """

    name: str
    param: tuple[str | int, ...]
    shape: tuple[int, ...]
    transpose: tuple[int, ...] | None = None
    mxfp4: bool = False
    part_of: str | None = None


def hf_tensors(cfg: ModelConfig, *, packed_experts: bool = False) -> list[HfTensor]:
    """Every weight of the model, declared once: its checkpoint name, our parameter path, its layout. With
    `packed_experts`, each expert weight is its MXFP4 blocks and scales, copied as stored."""
    hidden, vocab, inter, experts = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size, cfg.num_experts
    q_width, kv_width = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    swap = (1, 0)
    tensors = [HfTensor("model.embed_tokens.weight", ("embed",), (vocab, hidden))]
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.", ("layers", i)
        attn, mlp = ours + ("attn",), ours + ("mlp",)
        tensors += [
            HfTensor(hf + "input_layernorm.weight", ours + ("attn_norm", "scale"), (hidden,)),
            HfTensor(hf + "self_attn.q_proj.weight", attn + ("q",), (q_width, hidden), swap),
            HfTensor(hf + "self_attn.q_proj.bias", attn + ("q_bias",), (q_width,)),
            HfTensor(hf + "self_attn.k_proj.weight", attn + ("k",), (kv_width, hidden), swap),
            HfTensor(hf + "self_attn.k_proj.bias", attn + ("k_bias",), (kv_width,)),
            HfTensor(hf + "self_attn.v_proj.weight", attn + ("v",), (kv_width, hidden), swap),
            HfTensor(hf + "self_attn.v_proj.bias", attn + ("v_bias",), (kv_width,)),
            HfTensor(hf + "self_attn.o_proj.weight", attn + ("o",), (hidden, q_width), swap),
            HfTensor(hf + "self_attn.o_proj.bias", attn + ("o_bias",), (hidden,)),
            HfTensor(hf + "self_attn.sinks", attn + ("sinks",), (cfg.num_heads,)),
            HfTensor(hf + "post_attention_layernorm.weight", ours + ("mlp_norm", "scale"), (hidden,)),
            HfTensor(hf + "mlp.router.weight", mlp + ("router",), (experts, hidden), swap),
            HfTensor(hf + "mlp.router.bias", mlp + ("router_bias",), (experts,)),
            HfTensor(hf + "mlp.experts.gate_up_proj", mlp + ("gate_up",), (experts, hidden, 2 * inter), mxfp4=True),
            HfTensor(hf + "mlp.experts.gate_up_proj_bias", mlp + ("gate_up_bias",), (experts, 2 * inter)),
            HfTensor(hf + "mlp.experts.down_proj", mlp + ("down",), (experts, inter, hidden), mxfp4=True),
            HfTensor(hf + "mlp.experts.down_proj_bias", mlp + ("down_bias",), (experts, hidden)),
        ]
    tensors += [
        HfTensor("model.norm.weight", ("norm", "scale"), (hidden,)),
        HfTensor("lm_head.weight", ("unembed",), (vocab, hidden), swap),
    ]
    if packed_experts:
        tensors = [part for tensor in tensors for part in (packed_parts(tensor) if tensor.mxfp4 else [tensor])]
    return tensors


def packed_shapes(tensor: HfTensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """MXFP4 blocks and scales shapes of an expert weight (E, in, out): stored (E, out, in/32, 16) and (E, out, in/32)."""
    experts, fan_in, fan_out = tensor.shape
    groups = fan_in // mxfp4.VALUES_PER_BLOCK
    return (experts, fan_out, groups, mxfp4.VALUES_PER_BLOCK // 2), (experts, fan_out, groups)


def packed_parts(tensor: HfTensor) -> list[HfTensor]:
    """An expert weight's MXFP4 blocks and scales (`gate_up` -> `gate_up_blocks`, `gate_up_scales`), each a
    parameter in the checkpoint's own layout."""
    *path, leaf = tensor.param
    return [
        HfTensor(tensor.name + suffix, (*path, leaf + suffix), shape, part_of=tensor.name)
        for suffix, shape in zip(PACKED_SUFFIXES, packed_shapes(tensor), strict=True)
    ]


def is_packed(ckpt: HfCheckpoint, tensor: HfTensor) -> bool:
    return tensor.mxfp4 and tensor.name + "_blocks" in ckpt.names()


def stored_names(ckpt: HfCheckpoint, tensor: HfTensor) -> list[str]:
    return [tensor.name + s for s in PACKED_SUFFIXES] if is_packed(ckpt, tensor) else [tensor.name]


def check_packed_parts(ckpt: HfCheckpoint, tensors: list[HfTensor]) -> None:
    """Refuses to keep experts packed that the checkpoint stores dequantized: they are not requantized."""
    present = ckpt.names()
    for tensor in tensors:
        if tensor.part_of in present and tensor.name not in present:
            raise CheckpointError(
                f"{ckpt.where(tensor.part_of)}: tensor {tensor.part_of} is stored dequantized and the checkpoint "
                f"holds no MXFP4 blocks ({tensor.name}), so its experts cannot stay packed (they are not "
                "requantized): turn packed_experts off"
            )


def check_names(ckpt: HfCheckpoint, tensors: list[HfTensor]) -> None:
    """Refuses a checkpoint whose tensor names differ from what its config.json describes."""
    check_packed_parts(ckpt, tensors)
    expected = {name for t in tensors for name in stored_names(ckpt, t)}
    present = ckpt.names()
    if missing := sorted(expected - present):
        raise CheckpointError(f"{ckpt.directory}: missing tensors: {', '.join(missing[:8])}")
    if unknown := sorted(present - expected):
        raise CheckpointError(
            f"{ckpt.directory}: tensors that config.json does not describe: {', '.join(unknown[:8])}"
        )


def _check_shape(ckpt: HfCheckpoint, name: str, expected: tuple[int, ...]) -> None:
    actual = ckpt.shape(name)
    if actual != expected:
        raise CheckpointError(
            f"{ckpt.where(name)}: tensor {name} has shape {actual}, but config.json implies {expected}"
        )


def check_shapes(ckpt: HfCheckpoint, tensor: HfTensor) -> None:
    """Refuses a weight whose stored shapes differ from what config.json implies."""
    expected = packed_shapes(tensor) if is_packed(ckpt, tensor) else [tensor.shape]
    for name, shape in zip(stored_names(ckpt, tensor), expected, strict=True):
        _check_shape(ckpt, name, shape)


def read_hf_tensor(ckpt: HfCheckpoint, tensor: HfTensor, rows: slice | None = None) -> np.ndarray:
    """One weight in the Hugging Face layout (`tensor.shape`), MXFP4 decoded exactly to float32; or only
    `rows` of its first axis (the experts, for expert weights)."""
    check_shapes(ckpt, tensor)
    if is_packed(ckpt, tensor):
        blocks, scales = (ckpt.read(name, rows) for name in stored_names(ckpt, tensor))
        return mxfp4.decode_np(blocks, scales).transpose(0, 2, 1)
    return ckpt.read(tensor.name, rows)


def to_param_layout(value: np.ndarray, tensor: HfTensor, param_shape: tuple[int, ...]) -> np.ndarray:
    if tensor.transpose is not None:
        value = value.transpose(tensor.transpose)
    return value.reshape(param_shape)


def rows_axis(tensor: HfTensor, shape: tuple[int, ...]) -> int | None:
    """The axis of our layout (`shape`) that is the Hugging Face first axis (experts, vocabulary) where our
    layout only transposes theirs; None where it reshapes it."""
    order = tensor.transpose or tuple(range(len(tensor.shape)))
    return order.index(0) if tuple(tensor.shape[i] for i in order) == shape else None


def read_row_blocks(
    ckpt: HfCheckpoint, tensor: HfTensor, shape: tuple[int, ...], rows: range, granule: int = 1
) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, block in our layout) over `rows` of the `rows_axis` of a weight (our `shape`), a multiple
    of `granule` rows and about `ckpt.read_block_bytes` (counted in float32, what MXFP4 decodes to) at a time."""
    axis = rows_axis(tensor, shape)
    step = granule * max(1, ckpt.read_block_bytes // (granule * math.prod(shape) // shape[axis] * 4))
    for first in range(rows.start, rows.stop, step):
        block = slice(first, min(first + step, rows.stop))
        block_shape = (*shape[:axis], block.stop - first, *shape[axis + 1 :])
        yield first, to_param_layout(read_hf_tensor(ckpt, tensor, block), tensor, block_shape)


def read_box(ckpt: HfCheckpoint, tensor: HfTensor, shape: tuple[int, ...], box: tuple[slice, ...], dtype) -> np.ndarray:
    """The elements `box` (slices with start and stop) of a weight in our layout (`shape`), in `dtype`. Where
    our layout only transposes the checkpoint's, only the box's rows are read, a block at a time
    (`read_row_blocks`), so host memory holds the box and one block; else the whole weight is read."""
    axis = rows_axis(tensor, shape)
    if axis is None:
        return to_param_layout(read_hf_tensor(ckpt, tensor), tensor, shape)[box].astype(dtype)
    out = np.empty([part.stop - part.start for part in box], dtype)
    rows = box[axis]
    for first, block in read_row_blocks(ckpt, tensor, shape, range(rows.start, rows.stop)):
        source, target = list(box), [slice(None)] * len(shape)
        source[axis] = slice(None)
        target[axis] = slice(first - rows.start, first - rows.start + block.shape[axis])
        out[tuple(target)] = block[tuple(source)]
    return out
