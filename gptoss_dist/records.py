"""The batch job's records: one JSON object per line in, one per line out.

Input, one request a line (blank lines are skipped):

    id                string, required, unique in the file
    exactly one of
      prompt          text, encoded as plain data (no chat format)
      messages        a harmony conversation: [{"role", "content"}, ...] with roles system or developer (first
                      message only: the instructions), user, assistant and tool; an assistant message may name
                      its "channel" (analysis, commentary, final; default final) and may carry "tool_calls",
                      [{"name", "arguments"}, ...] (arguments: JSON text; its content, then optional, goes first,
                      on its channel, default analysis); a tool message {"role": "tool", "name", "content"} is
                      the result of a call of the declared tool `name`
      prompt_tokens   token ids
    reasoning_effort  low, medium or high; `messages` only (default: the run's harmony.reasoning_effort)
    tools             function tools the model may call; `messages` only: a list of {"type": "function", "name",
                      "description", "parameters": JSON Schema} (OpenAI's Responses API), or of {"type":
                      "function", "function": {"name", "description", "parameters"}} (its Chat Completions API);
                      names ([A-Za-z0-9_-], at most 64) unique; rendered as gptoss_dist.harmony says
    max_new_tokens, temperature, top_p, top_k, seed
                      sampling (defaults: the run's `sampling` settings)
    n                 completions (samples) of the prompt, 1 to MAX_SAMPLES (default 1); sample i is
                      seeded seed + i, so sample 0 is the completion of the same line with n=1
    stop              a string or a list of strings and token ids, at most MAX_STOP (how stop strings end a
                      completion: gptoss_dist.generate)
    logprobs          true: score each generated token (default false), with its `top_logprobs` (0 to 20,
                      default 0) most likely alternatives; the model's float32 log-probabilities, before
                      temperature, top-k and top-p
    prompt_logprobs   true: score each prompt token after the first (default false)

Strings are text: a JSON escape of a lone surrogate (`"\\ud800"`), which no tokenizer takes, makes the
record an error, except in `id`, which is only copied to the output (escaped there as it came).

Output, one line per request and sample, in `results`:

    line (from 1), id, index (the sample's, from 0), text (the completion's, without a final stop token or a
    stop string), tokens, finish_reason ("stop", "length" or "context"), usage {prompt_tokens, completion_tokens};
    if asked, `logprobs`, one per token of `tokens`: {token, text, logprob, rank (1: the most likely token),
    top_logprobs: [{token, text, logprob}, ...] (most likely first)}, and `prompt_logprobs`, one per prompt
    token after the first: {token, text, logprob};
    for `messages` requests also `analysis` and `final`, the text of those channels of the parsed completion
    (null where it has none), and `parse_error` where the completion is not valid harmony. A completion that
    ends in a tool call (`<|call|>`) has finish_reason "tool_calls" and `tool_calls`, [{"name", "arguments"}]
    (arguments: the JSON text as generated) for a call to `functions.NAME`, and `tool_call_error` where the
    call is not to a declared tool or its arguments are not valid JSON.

and one line per input line that cannot run, in `errors`: `line` (from 1), `id` (null where the line has
none), `error`. Whatever a line holds, it gets one or the other: any exception that reading, checking,
tokenizing or rendering it raises is its error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, get_args

from gptoss_dist.engine import MAX_REQUEST_STOP_TOKENS, MAX_SAMPLES
from gptoss_dist.harmony import ReasoningEffort, Tool
from gptoss_dist.sampling import MAX_TOP_LOGPROBS

PROMPT_FIELDS = ("prompt", "messages", "prompt_tokens")
MESSAGE_FIELDS = {"role", "content", "channel", "name", "tool_calls"}
TOOL_CALL_FIELDS = {"name", "arguments"}
TOOL_FIELDS = {"name", "description", "parameters"}
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
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
MESSAGES_ONLY = ("reasoning_effort", "tools")
SCORING_FLAGS = ("logprobs", "prompt_logprobs")
FIELDS = {"id", *PROMPT_FIELDS, *MESSAGES_ONLY, "stop", "n", *SAMPLING_RULES, *SCORING_FLAGS, "top_logprobs"}


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
    messages: tuple[dict[str, Any], ...] | None = None
    prompt_tokens: tuple[int, ...] | None = None
    reasoning_effort: ReasoningEffort | None = None
    tools: tuple[Tool, ...] = ()
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: bool = False


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


def _messages(value: Any) -> tuple[dict[str, Any], ...]:
    if not isinstance(value, list) or not value:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    for i, message in enumerate(value):
        _message(message, f"messages[{i}]")
    return tuple(value)


def _message(message: Any, where: str) -> None:
    if not isinstance(message, dict):
        raise ValueError(f"{where} must be an object with role and content, not {_show(message)}")
    if unknown := sorted(set(message) - MESSAGE_FIELDS):
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}")
    if "tool_calls" in message:
        _tool_calls(message["tool_calls"], f"{where}.tool_calls")
    texts = {"role": message.get("role"), "content": message.get("content")}
    texts |= {key: message[key] for key in ("channel", "name") if key in message}
    if message.get("role") == "assistant" and "tool_calls" in message and texts["content"] is None:
        del texts["content"]  # optional in a message with tool calls
    for key, text in texts.items():
        if not isinstance(text, str):
            raise ValueError(f"{where}.{key} must be a string, not {_show(text)}")
        check_text(text, f"{where}.{key}")


def _tool_calls(value: Any, where: str) -> None:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where} must be a non-empty list of {{name, arguments}} objects")
    for i, call in enumerate(value):
        if not isinstance(call, dict) or set(call) != TOOL_CALL_FIELDS:
            raise ValueError(f"{where}[{i}] must be an object with name and arguments only, not {_show(call)}")
        for key in sorted(TOOL_CALL_FIELDS):
            if not isinstance(call[key], str):
                raise ValueError(f"{where}[{i}].{key} must be a string, not {_show(call[key])}")
            check_text(call[key], f"{where}[{i}].{key}")


def parse_tools(value: Any) -> tuple[Tool, ...]:
    """The function tools of a `tools` list (see above), checked; ValueError, naming the tool, if one is not
    valid or two share a name."""
    if not isinstance(value, list):
        raise ValueError(f"tools must be a list of function tools, not {_show(value)}")
    checked = tuple(_tool(entry, f"tools[{i}]") for i, entry in enumerate(value))
    names = [tool.name for tool in checked]
    if twice := sorted({name for name in names if names.count(name) > 1}):
        raise ValueError(f"tools: duplicate tool name(s) {', '.join(map(repr, twice))}")
    return checked


def _tool(entry: Any, where: str) -> Tool:
    if not isinstance(entry, dict) or entry.get("type") != "function":
        raise ValueError(f'{where} must be an object with "type": "function", not {_show(entry)}')
    spec = entry["function"] if set(entry) == {"type", "function"} else {k: v for k, v in entry.items() if k != "type"}
    if not isinstance(spec, dict) or set(spec) - TOOL_FIELDS:
        raise ValueError(f"{where}: want name, description and parameters, not {_show(spec)}")
    name = spec.get("name")
    if not (isinstance(name, str) and TOOL_NAME.fullmatch(name)):
        raise ValueError(f"{where} needs a name of 1 to 64 letters, digits, _ and -, not {_show(name)}")
    where = f"tool {name!r}"
    description = spec.get("description", "")
    if not isinstance(description, str):
        raise ValueError(f"{where}: description must be a string, not {_show(description)}")
    parameters = spec.get("parameters")
    if not isinstance(parameters, dict | None):
        raise ValueError(f"{where}: parameters must be a JSON Schema object, not {_show(parameters)}")
    return Tool(name, check_text(description, f"{where}: description"), parameters)


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
    if applied := [field for field in MESSAGES_ONLY if field in data and "messages" not in data]:
        raise ValueError(f"{applied[0]} applies to messages only")
    if "tools" in data:
        prompt["tools"] = parse_tools(data["tools"])
    if "reasoning_effort" in data:
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
    return InputRecord(line, record_id, sampling, _stop(data.get("stop", [])), n=samples, **prompt, **_scoring(data))


def _scoring(data: dict[str, Any]) -> dict[str, bool | int]:
    """The record's scoring fields, checked."""
    scoring = {flag: data[flag] for flag in SCORING_FLAGS if flag in data}
    if bad := [flag for flag, value in scoring.items() if not isinstance(value, bool)]:
        raise ValueError(f"{bad[0]} must be true or false, not {_show(scoring[bad[0]])}")
    top = data.get("top_logprobs", 0)
    if not (isinstance(top, int) and not isinstance(top, bool) and 0 <= top <= MAX_TOP_LOGPROBS):
        raise ValueError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], not {_show(top)}")
    if top and not scoring.get("logprobs"):
        raise ValueError("top_logprobs needs logprobs: true")
    return scoring | {"top_logprobs": top}


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
