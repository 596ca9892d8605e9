"""`gptoss-convert`: a Hugging Face checkpoint to an orbax checkpoint (`gptoss_dist.converted`), local or on GCS.

    python -m gptoss_dist.convert --src=gs://bucket/gpt-oss-20b --dst=gs://bucket/gpt-oss-20b-bf16
    python -m gptoss_dist.convert --src=gs://bucket/gpt-oss-20b --dst=gs://bucket/gpt-oss-20b-mxfp4 --packed_experts

The source is checked whole first (every file, name and shape), so bad input fails before anything is
written. Weights then stream one at a time, and the large ones (experts, embeddings) a block of rows at a
time, so host memory stays near 1.5 GB whatever the model's size; writes go out in parallel, up to
IN_FLIGHT_BYTES at once. Everything goes into orbax's temporary directory, which orbax commits only after
every array has landed; a rerun after an interruption (kill -9 included) resumes there with the arrays not
yet recorded as written. With `--packed_experts` the experts' MXFP4 blocks and scales are copied as stored,
for runs with `packed_experts` (`gptoss_dist.converted`).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
from collections.abc import Iterator, Sequence

import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from flax import nnx
from tqdm import tqdm

from gptoss_dist import converted
from gptoss_dist.checkpoint import (
    CONFIG_FILE,
    READ_BLOCK_BYTES,
    CheckpointError,
    HfCheckpoint,
    HfTensor,
    check_names,
    check_shapes,
    hf_tensors,
    read_hf_tensor,
    read_row_blocks,
    rows_axis,
    to_param_layout,
)
from gptoss_dist.model import abstract_model
from gptoss_dist.paths import filesystem, is_local, join
from gptoss_dist.tokenizer import TOKENIZER_FILE

log = logging.getLogger(__name__)

# Copied beside the arrays when the source has them.
SIDE_FILES = (
    CONFIG_FILE, "generation_config.json", TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja",
)  # fmt: skip
IN_FLIGHT_BYTES = 512 << 20  # bytes handed to tensorstore and not yet written


def _blocks(ckpt: HfCheckpoint, tensor: HfTensor, spec: converted.ArraySpec) -> Iterator[tuple[int, int, np.ndarray]]:
    """(axis, first index, block in our layout) of a weight: blocks of whole write chunks along the axis that
    holds the Hugging Face rows (`checkpoint.read_row_blocks`), or else the whole weight at once."""
    shape = spec.shape
    axis = rows_axis(tensor, shape)
    if axis is None:
        yield 0, 0, to_param_layout(read_hf_tensor(ckpt, tensor), tensor, shape)
        return
    for first, block in read_row_blocks(ckpt, tensor, shape, range(shape[axis]), granule=spec.write_chunk[axis]):
        yield axis, first, block


def _write_weight(
    ckpt: HfCheckpoint, tensor: HfTensor, array: ts.TensorStore, spec: converted.ArraySpec, in_flight: converted.InFlight,
    bar: tqdm,
) -> None:  # fmt: skip
    """Starts writing one weight, one write chunk per tensorstore write."""
    for axis, first, block in _blocks(ckpt, tensor, spec):
        for box in spec.write_chunks(axis, range(first, first + block.shape[axis])):
            local = list(box)
            local[axis] = slice(box[axis].start - first, box[axis].stop - first)
            piece = block[tuple(local)].astype(spec.dtype, copy=False)
            in_flight.add([array[box].write(piece)], piece.nbytes, then=functools.partial(bar.update, piece.nbytes))


def _copy_side_files(src: str, dst: str) -> None:
    src_fs, dst_fs = filesystem(src), filesystem(dst)
    for name in SIDE_FILES:
        if src_fs.exists(join(src, name)):
            dst_fs.pipe_file(join(dst, name), src_fs.cat_file(join(src, name)))


def _check_source(ckpt: HfCheckpoint, tensors: list[HfTensor]) -> None:
    """Every file, name and shape, before anything is written."""
    check_names(ckpt, tensors)
    for tensor in tensors:
        check_shapes(ckpt, tensor)


def _write_arrays(
    ckpt: HfCheckpoint, tensors: list[HfTensor], conversion: converted.Conversion, show_progress: bool
) -> None:
    """Writes the arrays not yet written, recording each once all its writes have landed."""
    specs, in_flight = conversion.specs, converted.InFlight(IN_FLIGHT_BYTES)
    bar = tqdm(
        total=sum(spec.nbytes for spec in specs.values()), initial=sum(specs[name].nbytes for name in conversion.done),
        unit="B", unit_scale=True, unit_divisor=1024, desc="converting", disable=not show_progress,
    )  # fmt: skip
    with bar:
        for tensor in tensors:
            name = converted.array_name(tensor.param)
            if name not in conversion.done:
                array = converted.create_array(conversion.working, name, specs[name])
                _write_weight(ckpt, tensor, array, specs[name], in_flight, bar)
                in_flight.add([], then=functools.partial(conversion.record, name))
        in_flight.drain()


def convert(
    src: str,
    dst: str,
    *,
    dtype: str = "bfloat16",
    packed_experts: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
    write_chunk_bytes: int = converted.WRITE_CHUNK_BYTES,
    read_block_bytes: int = READ_BLOCK_BYTES,
) -> None:
    """Converts the Hugging Face checkpoint at `src` into `dst` (local paths or `gs://` URLs), weights in `dtype`;
    with `packed_experts`, expert weights as the source's MXFP4 blocks and scales. Each write chunk (one stored
    object) holds at most `write_chunk_bytes`, or one read chunk; the source is read in blocks of about
    `read_block_bytes` counted in float32 (`checkpoint.read_row_blocks`).

    Raises CheckpointError, naming the file, tensor or directory, for a bad source (or one without MXFP4
    experts, for `packed_experts`) or a destination that already holds a complete checkpoint (unless
    `overwrite`).
    """
    ckpt = HfCheckpoint(src, read_block_bytes=read_block_bytes)
    cfg = ckpt.config()
    tensors = hf_tensors(cfg, packed_experts=packed_experts)
    _check_source(ckpt, tensors)
    _, state = nnx.split(abstract_model(cfg, dtype=jnp.dtype(dtype), packed_experts=packed_experts))
    specs = converted.array_specs(state, write_chunk_bytes)
    source = os.path.abspath(src) if is_local(src) else src  # the same source however it is spelt
    conversion = converted.Conversion(dst, specs, source=source, overwrite=overwrite, packed_experts=packed_experts)
    if conversion.done:
        log.info("resuming: %d of %d arrays already written", len(conversion.done), len(specs))
    _copy_side_files(src, conversion.working)
    _write_arrays(ckpt, tensors, conversion, show_progress)
    conversion.complete()
    experts = "MXFP4" if packed_experts else dtype
    total_gb = sum(s.nbytes for s in specs.values()) / 1e9
    log.info("wrote %d arrays (%.2f GB, %s, experts %s) to %s", len(specs), total_gb, dtype, experts, dst)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="gptoss-convert", description="Convert a Hugging Face GPT-OSS checkpoint to an orbax checkpoint."
    )
    parser.add_argument("--src", required=True, help="Hugging Face checkpoint directory, local or gs://")
    parser.add_argument("--dst", required=True, help="where to write the converted checkpoint, local or gs://")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="stored weight dtype")
    parser.add_argument(
        "--packed_experts", action="store_true", help="keep the experts' MXFP4 blocks and scales as stored"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a complete checkpoint at --dst")
    parser.add_argument(
        "--write_chunk_bytes", type=int, default=converted.WRITE_CHUNK_BYTES,
        help="the most bytes in one stored object (a write chunk), unless one read chunk is larger",
    )  # fmt: skip
    parser.add_argument(
        "--read_block_bytes", type=int, default=READ_BLOCK_BYTES,
        help="about how many bytes (counted in float32) of a source tensor's rows are read and decoded at a time",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        convert(args.src, args.dst, dtype=args.dtype, packed_experts=args.packed_experts, overwrite=args.overwrite,
                show_progress=not args.no_progress, write_chunk_bytes=args.write_chunk_bytes,
                read_block_bytes=args.read_block_bytes)  # fmt: skip
    except CheckpointError as err:
        raise SystemExit(f"gptoss-convert: error: {err}") from err


if __name__ == "__main__":
    main()
