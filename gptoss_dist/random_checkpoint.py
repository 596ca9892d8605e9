"""Writes a random GPT-OSS checkpoint in the published Hugging Face layout, for tests, demos and benchmarks.

The layout is openai/gpt-oss-*'s: `config.json`, one safetensors file per layer plus one for the embeddings,
`model.safetensors.index.json`, bfloat16 weights and MXFP4 experts (or dequantized experts with
`packed=False`, as transformers saves them). Files are written one tensor at a time and each tensor a block
of rows (experts, vocabulary entries) at a time, about BLOCK_BYTES of float32, so host memory stays near a
block whatever the shapes (a 120B layer of 128 experts included). The values are those of one draw of the
whole tensor: a block's draw continues the tensor's random stream.

Where the vocabulary has room, a `tokenizer.json` comes along: byte-level, one token per byte and no merges,
plus the harmony control tokens, so text round-trips and harmony prompts render (the real o200k_harmony
vocabulary cannot be built without test-only packages).

    python -m gptoss_dist.random_checkpoint --config=configs/tiny.py --out=/tmp/tiny-hf
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
import tokenizers

from gptoss_dist import mxfp4
from gptoss_dist.checkpoint import CONFIG_FILE, INDEX_FILE, HfTensor, hf_tensors, packed_shapes
from gptoss_dist.config import ModelConfig
from gptoss_dist.harmony import CHANNEL, CONSTRAIN, END, MESSAGE, START
from gptoss_dist.settings import model_config
from gptoss_dist.tokenizer import CALL, END_OF_TEXT, RETURN, TOKENIZER_FILE

_DTYPE_NAMES = {np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float32): "F32", np.dtype(np.uint8): "U8"}

# What the published config.json says of its MXFP4 experts.
MXFP4_QUANTIZATION = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
}
# The byte tokenizer's control tokens, with ids 256, 257, ... in this order.
CONTROL_TOKENS = ("<|startoftext|>", END_OF_TEXT, RETURN, CONSTRAIN, CHANNEL, START, END, MESSAGE, CALL)
BYTE_TOKENIZER_SIZE = 256 + len(CONTROL_TOKENS)
BLOCK_BYTES = 256 << 20  # float32 values drawn at a time
# A stored tensor: its name, shape, dtype and a function that makes its value, in blocks of rows.
StoredTensor = tuple[str, tuple[int, ...], np.dtype, Callable[[], Iterable[np.ndarray]]]


def write_safetensors(path: Path, tensors: list[StoredTensor]) -> None:
    """Writes a safetensors file whose tensors are made and written one at a time, a block of rows at a time."""
    header, offset = {}, 0
    for name, shape, dtype, _ in tensors:
        size = int(np.prod(shape)) * dtype.itemsize
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, shape, dtype, make in tensors:
            rows = 0
            for block in make():
                assert block.shape[1:] == shape[1:] and block.dtype == dtype, (name, block.shape, block.dtype)
                f.write(np.ascontiguousarray(block).tobytes())
                rows += block.shape[0]
            assert rows == shape[0], (name, rows, shape)


def _stddev(tensor: HfTensor, cfg: ModelConfig) -> tuple[float, float]:
    """(mean, stddev) of a weight: scaled so activations stay O(1) and the SwiGLU clamp is sometimes hit."""
    name = tensor.name
    if name.endswith("norm.weight"):
        return 1.0, 0.1
    if name.endswith(("bias", "_bias")):
        return 0.0, 0.1
    if name.endswith(("sinks", "embed_tokens.weight")):
        return 0.0, 1.0
    if name.endswith("gate_up_proj"):
        return 0.0, 3.0 / np.sqrt(cfg.hidden_size)
    fan_in = tensor.shape[1] if tensor.transpose else tensor.shape[-2]
    return 0.0, 1.0 / np.sqrt(fan_in)


def _stored(tensor: HfTensor, cfg: ModelConfig, rng_seed: list[int], packed: bool) -> list[StoredTensor]:
    mean, std = _stddev(tensor, cfg)

    def values() -> Iterator[np.ndarray]:
        rng, shape = np.random.default_rng(rng_seed), tensor.shape
        rows = max(1, BLOCK_BYTES // (math.prod(shape[1:]) * 4))
        for first in range(0, shape[0], rows):
            yield rng.normal(mean, std, (min(rows, shape[0] - first), *shape[1:])).astype(np.float32)

    if not (tensor.mxfp4 and packed):
        bf16 = np.dtype(ml_dtypes.bfloat16)
        return [(tensor.name, tensor.shape, bf16, lambda: (block.astype(bf16) for block in values()))]
    blocks_shape, scales_shape = packed_shapes(tensor)
    u8 = np.dtype(np.uint8)
    scales: list[np.ndarray] = []  # the scales (1/16 of the codes' bytes), kept as the codes are written

    def codes() -> Iterator[np.ndarray]:
        for block in values():
            # (E, in, out) is stored as (E, out, in), quantized along `in`.
            block_codes, block_scales = mxfp4.encode_np(block.transpose(0, 2, 1))
            scales.append(block_scales)
            yield block_codes

    return [
        (tensor.name + "_blocks", blocks_shape, u8, codes),
        (tensor.name + "_scales", scales_shape, u8, lambda: scales),
    ]


def _file_groups(cfg: ModelConfig, tensors: list[HfTensor]) -> list[list[HfTensor]]:
    """One file per layer and one for everything outside the layers."""
    by_layer: list[list[HfTensor]] = [[] for _ in range(cfg.num_layers + 1)]
    for tensor in tensors:
        layer = tensor.param[1] if tensor.param[0] == "layers" else cfg.num_layers
        by_layer[layer].append(tensor)
    return by_layer


def byte_level_tokenizer() -> tokenizers.Tokenizer:
    """Token b is byte b (as the byte-level alphabet spells it), then CONTROL_TOKENS as special tokens."""
    alphabet = _byte_level_alphabet()
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    backend.add_special_tokens(list(CONTROL_TOKENS))
    return backend


def _byte_level_alphabet() -> list[str]:
    """The printable character that byte-level BPE (GPT-2's `bytes_to_unicode`) uses for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    unprintable = (b for b in range(256) if b not in printable)
    stand_ins = {b: chr(256 + i) for i, b in enumerate(unprintable)}
    return [chr(b) if b in printable else stand_ins[b] for b in range(256)]


def write_byte_tokenizer(directory: str | Path, vocab_size: int) -> Path:
    """Writes `byte_level_tokenizer()` as `directory/tokenizer.json` for a model of `vocab_size` ids."""
    if vocab_size < BYTE_TOKENIZER_SIZE:
        raise ValueError(
            f"a vocabulary of {vocab_size} ids cannot hold the byte tokenizer's {BYTE_TOKENIZER_SIZE} "
            "(256 bytes and the harmony control tokens)"
        )
    path = Path(directory) / TOKENIZER_FILE
    byte_level_tokenizer().save(str(path))
    return path


def write_random_checkpoint(
    directory: str | Path, cfg: ModelConfig, *, seed: int = 0, packed: bool = True
) -> Path:
    """Writes a random checkpoint of `cfg` to `directory` and returns it, with the byte tokenizer's
    `tokenizer.json` where `cfg.vocab_size` holds it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensors(cfg)
    seeds = {t.name: [seed, i] for i, t in enumerate(tensors)}
    groups = _file_groups(cfg, tensors)
    weight_map = {}
    for k, group in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        stored = [s for t in group for s in _stored(t, cfg, seeds[t.name], packed)]
        write_safetensors(directory / file, stored)
        weight_map |= {name: file for name, *_ in stored}
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    hf_config = cfg.to_hf_dict() | ({"quantization_config": MXFP4_QUANTIZATION} if packed else {})
    (directory / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2))
    if cfg.vocab_size >= BYTE_TOKENIZER_SIZE:
        write_byte_tokenizer(directory, cfg.vocab_size)
    return directory


def main(argv: Iterable[str] | None = None) -> None:
    from absl import app, flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, "A config file whose `model` section describes the model.")
    out = flags.DEFINE_string("out", None, "Directory to write the checkpoint to.", required=True)
    seed = flags.DEFINE_integer("seed", 0, "Random seed.")
    unpacked = flags.DEFINE_bool("unpacked", False, "Store experts dequantized instead of MXFP4.")

    def run(_):
        cfg = model_config(config.value)
        path = write_random_checkpoint(out.value, cfg, seed=seed.value, packed=not unpacked.value)
        has_tokenizer = (path / TOKENIZER_FILE).exists()
        note = "" if has_tokenizer else f" (no {TOKENIZER_FILE}: fewer than {BYTE_TOKENIZER_SIZE} ids)"
        print(f"wrote a random {cfg.num_layers}-layer GPT-OSS checkpoint to {path}{note}")

    app.run(run, argv=list(argv) if argv is not None else None)


if __name__ == "__main__":
    main()
