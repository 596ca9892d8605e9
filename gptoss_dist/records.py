"""The batch job's records: one JSON object per line in, one per line out.

Input, one request a line (blank lines are skipped):

    id                string, required, unique in the file
    exactly one of
      prompt          text, encoded as plain data (no chat format)
      messages        a harmony conversation: [{"role", "content"}, ...] with roles system or developer (first
                      message only: the instructions), user and assistant; an assistant message may name its
                      "channel" (analysis, commentary, final; default final)
      prompt_tokens   token ids
    reasoning_effort  low, medium or high; `messages` only (default: the run's harmony.reasoning_effort)
    max_new_tokens, temperature, top_p, top_k, seed
                      sampling (defaults: the run's `sampling` settings)
    n                 completions (samples) of the prompt, 1 to MAX_SAMPLES (default 1); sample i is
                      seeded seed + i, so sample 0 is the completion of the same line with n=1
    stop              a string or a list of strings and token ids, at most MAX_STOP (how stop strings end a
                      completion: gptoss_dist.generate)

Strings are text: a JSON escape of a lone surrogate (`"\\ud800"`), which no tokenizer takes, makes the
record an error, except in `id`, which is only copied to the output (escaped there as it came).

Output, one line per request and sample, in `results`:

    line (from 1), id, index (the sample's, from 0), text (the completion's, without a final stop token or a
    stop string), tokens, finish_reason ("stop", "length" or "context"), usage {prompt_tokens, completion_tokens};
    for `messages` requests also `analysis` and `final`, the text of those channels of the parsed completion
    (null where it has none), and `parse_error` where the completion is not valid harmony.

and one line per input line that cannot run, in `errors`: `line` (from 1), `id` (null where the line has
none), `error`. Whatever a line holds, it gets one or the other: any exception that reading, checking,
tokenizing or rendering it raises is its error.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, get_args

from gptoss_dist.engine import MAX_REQUEST_STOP_TOKENS, MAX_SAMPLES
from gptoss_dist.harmony import ReasoningEffort

PROMPT_FIELDS = ("prompt", "messages", "prompt_tokens")
MESSAGE_FIELDS = {"role", "content", "channel"}
MAX_STOP = MAX_REQUEST_STOP_TOKENS  # entries of `stop`, each of which may become a stop token id
# Sampling field: (type, check, what the check wants). The engine holds the integers in int32 and uint32.
SAMPLING_RULES: dict[str, tuple[type, Callable[[Any], bool], str]] = {
    "max_new_tokens": (int, lambda v: 1 <= v < 2**31, "an integer in [1, 2**31)"),
    "temperature": (float, lambda v: v >= 0, "a number >= 0"),
    "top_p": (float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (int, lambda v: 0 <= v < 2**31, "an integer in [0, 2**31) (0: no top-k)"),
    "seed": (int, lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"),
}
REASONING_EFFORTS = get_args(ReasoningEffort)
FIELDS = {"id", *PROMPT_FIELDS, "reasoning_effort", "stop", "n", *SAMPLING_RULES}


class RecordError(Exception):
    """An input line that cannot run: its line number, its id (None if it has none) and why."""

    def __init__(self, line: int, record_id: str | None, message: str):
        super().__init__(f"line {line}" + (f" (id {record_id!r})" if record_id is not None else "") + f": {message}")
        self.line, self.id, self.message = line, record_id, message

    def to_json(self) -> dict[str, Any]:
        return {"line": self.line, "id": self.id, "error": self.message}


def error_message(err: Exception) -> str:
    """What an exception says about a record: a ValueError's message is the checks' own, any other is a
    surprise that the record caused, named by its type."""
    return str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"


@dataclasses.dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int


@dataclasses.dataclass(frozen=True)
class InputRecord:
    """One valid input line; exactly one of `prompt`, `messages` and `prompt_tokens` is set."""

    line: int
    id: str
    sampling: Sampling
    stop: tuple[str | int, ...] = ()
    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    prompt_tokens: tuple[int, ...] | None = None
    reasoning_effort: ReasoningEffort | None = None
    n: int = 1


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def sampling_value(field: str, value: Any) -> int | float:
    """`value` for sampling `field`, checked; ValueError, naming the field, if it does not fit."""
    kind, fits, wanted = SAMPLING_RULES[field]
    allowed = (int,) if kind is int else (int, float)
    try:
        ok = isinstance(value, allowed) and not isinstance(value, bool) and math.isfinite(value) and fits(value)
    except OverflowError:  # an integer too large for a float
        ok = False
    if not ok:
        raise ValueError(f"{field} must be {wanted}, not {_show(value)}")
    return kind(value)


def sampling_defaults(settings: Mapping[str, Any]) -> Sampling:
    """The run's `sampling` settings, checked: ValueError, naming the setting, if one does not fit."""
    try:
        return Sampling(**{field: sampling_value(field, settings[field]) for field in SAMPLING_RULES})
    except ValueError as err:
        raise ValueError(f"sampling.{err}") from err


def check_text(value: str, field: str) -> str:
    """`value`, if UTF-8 can hold it; ValueError, naming `field`, for a lone surrogate (which a JSON escape or
    a terminal's undecodable bytes can give), which is not a character and which no tokenizer takes."""
    try:
        value.encode()
    except UnicodeEncodeError as err:
        surrogate = _show(value[err.start])
        raise ValueError(f"{field} is not valid text: a lone surrogate {surrogate} at {err.start}") from None
    return value


def _messages(value: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be an object with role and content, not {_show(message)}")
        if unknown := sorted(set(message) - MESSAGE_FIELDS):
            raise ValueError(f"messages[{i}]: unknown field(s) {', '.join(unknown)}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise ValueError(f"messages[{i}].{key} must be a string, not {_show(message.get(key))}")
        if not isinstance(message.get("channel", ""), str):
            raise ValueError(f"messages[{i}].channel must be a string, not {_show(message['channel'])}")
        for key, text in message.items():
            check_text(text, f"messages[{i}].{key}")
    return tuple(value)


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _token_ids(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError("prompt_tokens must be a non-empty list of token ids")
    if bad := [t for t in value if not _is_token_id(t)]:
        raise ValueError(f"prompt_tokens must hold token ids (integers >= 0), not {_show(bad[0])}")
    return tuple(value)


def _stop(value: Any) -> tuple[str | int, ...]:
    entries = [value] if isinstance(value, str) else value
    if not isinstance(entries, list) or len(entries) > MAX_STOP:
        raise ValueError(f"stop must be a string or a list of at most {MAX_STOP} strings and token ids")
    for entry in entries:
        if not (_is_token_id(entry) or (isinstance(entry, str) and entry)):
            raise ValueError(f"stop entries must be non-empty strings or token ids, not {_show(entry)}")
        if isinstance(entry, str):
            check_text(entry, "stop")
    return tuple(entries)


def _record(line: int, record_id: str, data: dict[str, Any], defaults: Sampling) -> InputRecord:
    """The record of a JSON object with a valid id; ValueError, naming the field, for anything else."""
    if unknown := sorted(set(data) - FIELDS):
        raise ValueError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(FIELDS))}")
    given = [field for field in PROMPT_FIELDS if field in data]
    if len(given) != 1:
        raise ValueError(f"need exactly one of {', '.join(PROMPT_FIELDS)}, got {', '.join(given) or 'none'}")
    prompt: dict[str, Any] = {}
    if "prompt" in data:
        if not isinstance(data["prompt"], str) or not data["prompt"]:
            raise ValueError(f"prompt must be a non-empty string, not {_show(data['prompt'])}")
        prompt["prompt"] = check_text(data["prompt"], "prompt")
    elif "messages" in data:
        prompt["messages"] = _messages(data["messages"])
    else:
        prompt["prompt_tokens"] = _token_ids(data["prompt_tokens"])
    if "reasoning_effort" in data:
        if "messages" not in data:
            raise ValueError("reasoning_effort applies to messages only")
        if data["reasoning_effort"] not in REASONING_EFFORTS:
            raise ValueError(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, "
                             f"not {_show(data['reasoning_effort'])}")  # fmt: skip
        prompt["reasoning_effort"] = data["reasoning_effort"]
    overrides = {field: sampling_value(field, data[field]) for field in SAMPLING_RULES if field in data}
    sampling = dataclasses.replace(defaults, **overrides)
    samples = data.get("n", 1)
    if not (type(samples) is int and 1 <= samples <= MAX_SAMPLES):
        raise ValueError(f"n must be an integer in [1, {MAX_SAMPLES}], not {_show(samples)}")
    if sampling.seed + samples > 2**32:
        raise ValueError(f"seed + n must be at most 2**32 (sample i is seeded seed + i): {sampling.seed} + {samples}")
    return InputRecord(line, record_id, sampling, _stop(data.get("stop", [])), n=samples, **prompt)


def _json_object(text: bytes | str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError; nesting too deep to parse
        raise ValueError(f"not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"not a JSON object but {type(data).__name__}")
    return data


def _record_id(data: dict[str, Any]) -> str:
    if "id" not in data:
        raise ValueError("missing id")
    if not isinstance(data["id"], str) or not data["id"]:
        raise ValueError(f"id must be a non-empty string, not {_show(data['id'])}")
    return data["id"]


def parse_record(line: int, text: bytes | str, defaults: Sampling) -> InputRecord:
    """The request on input line number `line`; RecordError, with the line and the id if known, if it is not
    a valid one, whatever the exception its bytes cause."""
    record_id = None
    try:
        data = _json_object(text)
        record_id = _record_id(data)
        return _record(line, record_id, data, defaults)
    except Exception as err:  # noqa: BLE001  whatever a line's bytes cause is that line's error
        raise RecordError(line, record_id, error_message(err)) from None


def _duplicate(record: InputRecord | RecordError, claimed_by: int) -> RecordError:
    where = f"first on line {claimed_by}" if claimed_by < record.line else f"line {claimed_by} holds its result"
    return RecordError(record.line, record.id, f"duplicate id {record.id!r}, {where}")


def read_records(
    lines: Iterable[tuple[int, bytes]], defaults: Sampling, results: Mapping[str, int] | None = None
) -> Iterator[InputRecord | RecordError]:
    """A record, or the error that stops it, per numbered line. An id's first line claims it, valid or not,
    unless `results` (id: line, of results an earlier run wrote) gives it to another line; a line with an id
    that another line claims is an error."""
    claimed = dict(results or {})
    for number, text in lines:
        try:
            record: InputRecord | RecordError = parse_record(number, text, defaults)
        except RecordError as err:
            record = err
        if record.id is not None and claimed.setdefault(record.id, number) != number:
            record = _duplicate(record, claimed[record.id])
        yield record
