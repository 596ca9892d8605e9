"""The checkpoint's tokenizer: request text in, token ids out, and back.

Request text is always encoded as *data*: a control-token string such as
``<|start|>`` typed by a user is split into ordinary byte-pair tokens, never
turned into the control token. Control tokens only enter a prompt through
:meth:`Tokenizer.token_id` (see ``gptoss_dist.harmony``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from os import PathLike

import tokenizers

from gptoss_dist.checkpoint import CheckpointError
from gptoss_dist.paths import filesystem, join

#: The tokenizer's file in a checkpoint directory.
TOKENIZER_FILE = "tokenizer.json"
RETURN, END_OF_TEXT, CALL = "<|return|>", "<|endoftext|>", "<|call|>"
#: Tokens that end generation for GPT-OSS (done, end of document, tool call): their names and their ids in the
#: published vocabulary (o200k_harmony). A checkpoint's own tokenizer is asked for the ids of these names.
STOP_TOKENS = {RETURN: 200002, END_OF_TEXT: 199999, CALL: 200012}


class Tokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` that encodes text as data.

    ``stop_token_ids`` holds the ids of those of :data:`STOP_TOKENS` that the
    vocabulary has (a tiny demo vocabulary may lack some), in that order.
    """

    def __init__(self, backend: tokenizers.Tokenizer) -> None:
        """Wrap ``backend``, which this object takes over and reconfigures."""
        # `encode_special_tokens` keeps only *special* added tokens from being
        # matched inside text, so mark every added token special first.
        backend.add_special_tokens(
            [
                tokenizers.AddedToken(token.content, special=True, normalized=False)
                for token in backend.get_added_tokens_decoder().values()
                if not token.special
            ]
        )
        backend.encode_special_tokens = True
        self._backend = backend
        self.stop_token_ids = self.find_token_ids(STOP_TOKENS)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added (control) tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        """Id of the vocabulary entry ``token`` (e.g. ``"<|start|>"``); KeyError if absent."""
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return token_id

    def find_token_ids(self, tokens: Iterable[str]) -> tuple[int, ...]:
        """Ids of those of ``tokens`` that the vocabulary has, in order."""
        ids = map(self._backend.token_to_id, tokens)
        return tuple(token_id for token_id in ids if token_id is not None)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` as plain data: no control tokens, no added BOS/EOS."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; control tokens appear as their names unless skipped."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)


def load_tokenizer(path: str | PathLike[str]) -> Tokenizer:
    """The tokenizer in a checkpoint directory (its :data:`TOKENIZER_FILE`), or in that file itself, a local
    path or a ``gs://`` URL. CheckpointError, naming the file, if it is missing or not a tokenizer."""
    path = str(path).rstrip("/")
    fs = filesystem(path)
    if fs.isdir(path):
        path = join(path, TOKENIZER_FILE)
    try:
        return Tokenizer(tokenizers.Tokenizer.from_str(fs.cat_file(path).decode()))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint must hold its tokenizer") from None
    except Exception as err:  # tokenizers raises plain Exceptions
        raise CheckpointError(f"{path}: not a readable tokenizer: {err}") from err
