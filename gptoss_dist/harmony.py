"""OpenAI's harmony chat format, as GPT-OSS was trained on it.

Rendering is token-exact with ``openai-harmony``'s
``render_conversation_for_completion(conversation, Role.ASSISTANT)`` when the
conversation starts with its default system content (``SystemContent.new()``
with the settings given here). Parsing follows its
``parse_messages_from_completion_tokens(tokens, Role.ASSISTANT)`` and also
accepts a completion cut off by a token limit.

Function tools are rendered into the developer message as ``openai-harmony``'s
``DeveloperContent.with_function_tools(...)`` renders them: each tool's JSON
Schema as a TypeScript type. The schema features rendered are types (object,
string, number, integer, boolean, array, a list of types), properties,
required, enums, defaults, descriptions, titles, examples and nullable;
``oneOf`` is refused (a ValueError naming the tool).

Every piece of text (role names, channel names, message content, tool
descriptions) is encoded separately and as data, as ``openai-harmony`` does,
so a control-token string inside a message stays plain text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from gptoss_dist.tokenizer import CALL, END_OF_TEXT, RETURN, Tokenizer

ReasoningEffort = Literal["low", "medium", "high"]

DEFAULT_MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
DEFAULT_KNOWLEDGE_CUTOFF = "2024-06"
VALID_CHANNELS = ("analysis", "commentary", "final")

START, MESSAGE, END, CHANNEL = "<|start|>", "<|message|>", "<|end|>", "<|channel|>"
CONSTRAIN = "<|constrain|>"
#: Tokens that close a message in a completion.
MESSAGE_ENDS = (END, RETURN, CALL)
#: The namespace of function tools: a call goes to ``functions.NAME``.
FUNCTIONS = "functions"
#: The channel of tool calls and tool results.
TOOL_CHANNEL = "commentary"
#: The content type of a function call's arguments.
JSON_ARGUMENTS = "json"
#: TypeScript's names of JSON Schema's scalar types.
SCALAR_TYPES = {"number": "number", "integer": "number", "boolean": "boolean"}
#: The system message's line when the conversation declares function tools.
FUNCTION_ROUTING = f"Calls to these tools must go to the {TOOL_CHANNEL} channel: '{FUNCTIONS}'."


@dataclass(frozen=True)
class Message:
    """One harmony message: who wrote it, on which channel, to whom, and its text.

    ``role`` is the first word of a parsed header (a tool's name for a tool's
    message); ``content_type`` is the header's format hint, e.g.
    ``"<|constrain|>json"`` on a tool call.
    """

    role: str
    content: str
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None


@dataclass(frozen=True)
class Tool:
    """A function tool the model may call: its name, what it does, and its parameters' JSON Schema (an object
    schema; None: a tool without parameters)."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class ToolCall:
    """A call of function tool ``name`` with ``arguments``, the JSON text as written."""

    name: str
    arguments: str


def render_for_completion(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: Tokenizer,
    *,
    tools: Sequence[Tool] = (),
    reasoning_effort: ReasoningEffort | None = "medium",
    current_date: str | None = None,
    knowledge_cutoff: str | None = DEFAULT_KNOWLEDGE_CUTOFF,
    model_identity: str | None = DEFAULT_MODEL_IDENTITY,
) -> list[int]:
    """Prompt ids for ``messages``, ending with the generation prompt ``<|start|>assistant``.

    Each message is a dict with ``role`` and ``content``. A first message with
    role ``system`` or ``developer`` holds the developer instructions (as in
    OpenAI's chat API); the harmony system message itself is always rendered
    from the keyword settings, where ``None`` leaves that line out. ``tools``
    go into the developer message. The other messages are ``user``,
    ``assistant`` or ``tool``:

    - an assistant message may name its ``channel`` (default ``final``) and
      may carry ``tool_calls``, a list of ``{"name", "arguments"}``, each
      rendered as a call on the commentary channel; its ``content``, if any,
      then goes first, on its channel (default ``analysis``);
    - a tool message ``{"role": "tool", "name", "content"}`` is the result of
      a call of the declared tool ``name``.

    As ``openai-harmony`` does, when the last assistant message is final,
    analysis messages before the first final one are dropped.
    """
    names = [tool.name for tool in tools]
    instructions, turns = _read_messages(messages, names)
    system = _system_text(reasoning_effort, current_date, knowledge_cutoff, model_identity, bool(tools))
    ids = _render(tokenizer, Message("system", system))
    developer = [f"# Instructions\n\n{instructions}"] if instructions is not None else []
    developer += [_tools_text(tools)] if tools else []
    if developer:
        ids += _render(tokenizer, Message("developer", "\n\n".join(developer)))
    for turn in _drop_old_analysis(turns):
        ids += _render(tokenizer, turn)
    return ids + [tokenizer.token_id(START), *tokenizer.encode("assistant")]


def parse_completion(tokens: Iterable[int], tokenizer: Tokenizer) -> dict[str, str]:
    """Text per channel (``analysis``, ``commentary``, ``final``) of a completion.

    The texts of several messages on one channel are joined by a blank line;
    a message without a channel is keyed by ``""``.
    """
    return channel_texts(parse_messages(tokens, tokenizer))


def channel_texts(messages: Iterable[Message]) -> dict[str, str]:
    """Text per channel of ``messages``, as ``parse_completion`` gives it."""
    texts: dict[str, list[str]] = {}
    for message in messages:
        texts.setdefault(message.channel or "", []).append(message.content)
    return {channel: "\n\n".join(parts) for channel, parts in texts.items()}


def parse_messages(tokens: Iterable[int], tokenizer: Tokenizer) -> list[Message]:
    """Messages of the completion ``tokens`` generated after a ``<|start|>assistant`` prompt.

    A message cut off in its content is kept with its text so far (as
    ``openai-harmony`` does), one cut off in its header is left out (where
    ``openai-harmony`` raises), and ``<|endoftext|>`` ends the completion.
    Raises ValueError on a token outside a message or a malformed header.
    """
    return parse_reply(tokens, tokenizer)[0]


def parse_reply(tokens: Iterable[int], tokenizer: Tokenizer) -> tuple[list[Message], Message | None]:
    """The messages of a completion, as ``parse_messages`` gives them, and the call it ends with: the message
    that its last token, ``<|call|>``, closes (None if its last token closes no call)."""
    start, message = tokenizer.token_id(START), tokenizer.token_id(MESSAGE)
    ends = set(tokenizer.find_token_ids(MESSAGE_ENDS))
    stop = set(tokenizer.find_token_ids([END_OF_TEXT]))
    parsed: list[Message] = []
    state = "header"  # the prompt already opened an assistant message
    role: str | None = "assistant"
    header: list[int] = []
    body: list[int] = []
    closed_by = None  # the end token that the last token was
    for token in tokens:
        closed_by = None
        if token in stop:
            break
        if state == "start":
            if token != start:
                raise ValueError(f"unexpected token {token} where a message should start")
            state, role, header = "header", None, []
        elif state == "header":
            if token == message:
                state, body = "content", []
            else:
                header.append(token)
        elif token in ends:
            parsed.append(_parse_message(tokenizer, header, role, body))
            state, closed_by = "start", token
        else:
            body.append(token)
    if state == "content":
        parsed.append(_parse_message(tokenizer, header, role, body))
    call = parsed[-1] if closed_by in tokenizer.find_token_ids([CALL]) else None
    return parsed, call


def tool_calls(messages: Iterable[Message]) -> list[ToolCall]:
    """The function calls among parsed ``messages``: those addressed to ``functions.NAME``."""
    prefix = f"{FUNCTIONS}."
    return [
        ToolCall(m.recipient.removeprefix(prefix), m.content)
        for m in messages
        if m.recipient is not None and m.recipient.startswith(prefix)
    ]


def _read_messages(
    messages: Sequence[Mapping[str, Any]], tool_names: Sequence[str]
) -> tuple[str | None, list[Message]]:
    """The developer instructions (if any) and the conversation turns of ``messages``."""
    instructions = None
    if messages and messages[0]["role"] in ("system", "developer"):
        instructions, messages = messages[0]["content"], messages[1:]
    turns = []
    for message in messages:
        role = message["role"]
        if role == "assistant":
            turns += _assistant_turns(message, tool_names)
        elif role == "tool":
            name = _declared(message.get("name"), tool_names, "a tool message")
            turns.append(Message(f"{FUNCTIONS}.{name}", message["content"], TOOL_CHANNEL, "assistant"))
        elif role == "user":
            turns.append(Message(role, message["content"]))
        else:
            raise ValueError(f"message role {role!r}: want user, assistant or tool (system or developer only first)")
    return instructions, turns


def _assistant_turns(message: Mapping[str, Any], tool_names: Sequence[str]) -> list[Message]:
    """An assistant message's text on its channel, then its tool calls."""
    calls = message.get("tool_calls", [])
    channel = message.get("channel", "analysis" if calls else "final")
    if channel not in VALID_CHANNELS:
        raise ValueError(f"assistant channel {channel!r} is not one of {VALID_CHANNELS}")
    content = message.get("content") or ""
    turns = [Message("assistant", content, channel)] if content or not calls else []
    for call in calls:
        name = _declared(call["name"], tool_names, "a tool call")
        recipient = f"{FUNCTIONS}.{name}"
        turns.append(Message("assistant", call["arguments"], TOOL_CHANNEL, recipient, CONSTRAIN + JSON_ARGUMENTS))
    return turns


def _declared(name: Any, tool_names: Sequence[str], what: str) -> str:
    """``name``, if it names a declared tool; ValueError saying what names it otherwise."""
    if name not in tool_names:
        declared = ", ".join(tool_names) or "none"
        raise ValueError(f"{what} names tool {name!r}, which is not declared (tools: {declared})")
    return name


def _system_text(
    reasoning_effort: str | None,
    current_date: str | None,
    knowledge_cutoff: str | None,
    model_identity: str | None,
    function_tools: bool,
) -> str:
    """The text of harmony's system message, section by section as ``openai-harmony`` writes it."""
    if reasoning_effort not in (None, *get_args(ReasoningEffort)):
        raise ValueError(f"reasoning_effort must be low, medium or high, not {reasoning_effort!r}")
    top = [
        line
        for line in (
            model_identity,
            None if knowledge_cutoff is None else f"Knowledge cutoff: {knowledge_cutoff}",
            None if current_date is None else f"Current date: {current_date}",
        )
        if line is not None
    ]
    sections = ["\n".join(top)] if top else []
    if reasoning_effort is not None:
        sections.append(f"Reasoning: {reasoning_effort}")
    channels = f"# Valid channels: {', '.join(VALID_CHANNELS)}. Channel must be included for every message."
    sections.append(channels + (f"\n{FUNCTION_ROUTING}" if function_tools else ""))
    return "\n\n".join(sections)


def _drop_old_analysis(turns: list[Message]) -> list[Message]:
    """``turns`` less the analysis messages that ``openai-harmony`` drops from a prompt."""
    assistant_channels = [turn.channel for turn in turns if turn.role == "assistant"]
    if not assistant_channels or assistant_channels[-1] != "final":
        return turns
    first_final = next(i for i, turn in enumerate(turns) if turn.channel == "final")
    return [turn for i, turn in enumerate(turns) if i >= first_final or turn.channel != "analysis"]


def _render(tokenizer: Tokenizer, message: Message) -> list[int]:
    """Ids of one message: ``<|start|>role[ to=recipient][<|channel|>channel][ <|constrain|>type]<|message|>``,
    the content and ``<|end|>``, or ``<|call|>`` for an assistant's message to a tool."""
    ids = [tokenizer.token_id(START), *tokenizer.encode(message.role)]
    if message.recipient is not None:
        ids += tokenizer.encode(f" to={message.recipient}")
    if message.channel is not None:
        ids += [tokenizer.token_id(CHANNEL), *tokenizer.encode(message.channel)]
    if message.content_type is not None:
        constraint = message.content_type.removeprefix(CONSTRAIN)
        ids += [*tokenizer.encode(" "), tokenizer.token_id(CONSTRAIN), *tokenizer.encode(constraint)]
    end = CALL if message.role == "assistant" and message.recipient is not None else END
    return ids + [tokenizer.token_id(MESSAGE), *tokenizer.encode(message.content), tokenizer.token_id(end)]


# ---------------------------------------------------------------------------------------- tools as TypeScript


def _tools_text(tools: Sequence[Tool]) -> str:
    """The developer message's ``# Tools`` section declaring ``tools`` in the functions namespace."""
    lines = [f"## {FUNCTIONS}\n", f"namespace {FUNCTIONS} {{\n"]
    for tool in tools:
        lines += [f"// {line}" for line in _lines(tool.description)]
        try:
            arguments = "" if tool.parameters is None else f"_: {_schema_text(tool.parameters, '')}"
        except ValueError as err:
            raise ValueError(f"tool {tool.name!r}: parameters {err}") from None
        lines.append(f"type {tool.name} = ({arguments}) => any;\n")
    lines.append(f"}} // namespace {FUNCTIONS}")
    return "# Tools\n\n" + "\n".join(lines)


def _lines(text: str) -> list[str]:
    """``text`` split into lines as Rust's ``str::lines`` splits it (``openai-harmony`` does so): at ``\n`` or
    ``\r\n``, with no last empty line after a final line break."""
    lines = text.split("\n")
    last = lines.pop()
    return [line.removesuffix("\r") for line in lines] + ([last] if last else [])


def _schema_text(schema: Any, indent: str) -> str:
    """The TypeScript type of a JSON Schema; nested lines start with ``indent``."""
    if not isinstance(schema, Mapping):
        raise ValueError(f"schema {_short(schema)} is not an object")
    if "oneOf" in schema:
        raise ValueError("oneOf is not supported")
    kind = schema.get("type")
    if isinstance(kind, list):
        names = [{"integer": "number"}.get(name, name) for name in kind if isinstance(name, str)]
        return " | ".join(names) if names else "any"
    if kind == "object":
        return _object_text(schema, indent)
    if kind == "string":
        values = [f'"{value}"' for value in _enum(schema) if isinstance(value, str)]
        return " | ".join(values) if values else "string"
    if kind == "array":
        return f"{_schema_text(schema['items'], indent)}[]" if "items" in schema else "Array<any>"
    return SCALAR_TYPES.get(kind, "any") if isinstance(kind, str) else "any"


def _object_text(schema: Mapping[str, Any], indent: str) -> str:
    """An object type: ``{``, a line per property, and ``}``, with the schema's description above."""
    properties = _typed(schema, "properties", Mapping, {})
    required = set(_typed(schema, "required", list, []))
    description = _typed(schema, "description", str, None)
    text = f"{indent}// {description}\n{{\n" if description is not None else "{\n"
    for name, value in properties.items():
        text += _property_text(name, value, name in required, indent)
    return text + f"{indent}}}"


def _property_text(name: str, schema: Any, required: bool, indent: str) -> str:
    """One property's lines: its title, description and examples as comments, then ``name?: type, // default``."""
    try:
        type_text = _schema_text(schema, indent + "    ")
    except ValueError as err:
        raise ValueError(f"property {name!r}: {err}") from None
    text = ""
    if (title := _typed(schema, "title", str, None)) is not None:
        text += f"{indent}// {title}\n{indent}//\n"
    if (description := _typed(schema, "description", str, None)) is not None:
        text += f"{indent}// {description}\n"
    if examples := _typed(schema, "examples", list, []):
        text += f"{indent}// Examples:\n" + "".join(f'{indent}// - "{e}"\n' for e in examples if isinstance(e, str))
    if schema.get("nullable") is True and "null" not in type_text:
        type_text += " | null"
    text += f"{indent}{name}{'' if required else '?'}: {type_text},"
    if "default" in schema:
        text += f" // default: {_default_text(schema)}"
    return text + "\n"


def _default_text(schema: Mapping[str, Any]) -> str:
    """A property's default as ``openai-harmony`` writes it: a string quoted unless the property is an enum,
    anything else as compact JSON."""
    default = schema["default"]
    if isinstance(default, str):
        return default if _enum(schema) else f'"{default}"'
    return json.dumps(default, ensure_ascii=False, separators=(",", ":"))


def _enum(schema: Mapping[str, Any]) -> list[Any]:
    return _typed(schema, "enum", list, [])


def _typed(schema: Mapping[str, Any], key: str, kind: type, absent: Any) -> Any:
    """``schema[key]``, which must be a ``kind``, or ``absent`` when the schema has no ``key``."""
    if key not in schema:
        return absent
    if not isinstance(schema[key], kind):
        wanted = {str: "a string", list: "a list", Mapping: "an object"}[kind]
        raise ValueError(f"{key} {_short(schema[key])} is not {wanted}")
    return schema[key]


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _parse_message(tokenizer: Tokenizer, header: list[int], role: str | None, body: list[int]) -> Message:
    """A message from its header ids (between ``<|start|>`` and ``<|message|>``) and content ids.

    ``role`` is the role already known from the prompt, or None when the
    header names it. The header reads ``[role][<|channel|>channel][ to=recipient][ content_type]``.
    """
    text = tokenizer.decode(header)
    channel = None
    before, marker, after = text.partition(CHANNEL)
    if marker:
        channel = re.split(r"[\s<]", after, maxsplit=1)[0]
        if not channel:
            raise ValueError(f"message header {text!r} has a channel marker but no channel")
        text = before + after[len(channel) :]
    parts = text.replace(CONSTRAIN, f" {CONSTRAIN}").split()
    if role is None:
        if not parts:
            raise ValueError("message header names no role")
        role = parts.pop(0)
    elif parts and parts[0] == role:
        parts.pop(0)
    recipient = content_type = None
    if len(parts) == 1 or (parts and parts[-1].startswith("to=")):
        recipient = parts.pop().removeprefix("to=")
    elif parts:
        content_type = parts.pop()
        recipient = parts.pop().removeprefix("to=")
    if parts:
        raise ValueError(f"unexpected words {parts} in message header {text!r}")
    return Message(role, tokenizer.decode(body), channel, recipient, content_type)
