"""OpenAI's harmony chat format, as GPT-OSS was trained on it.

Rendering is token-exact with ``openai-harmony``'s
``render_conversation_for_completion(conversation, Role.ASSISTANT)`` when the
conversation starts with its default system content (``SystemContent.new()``
with the settings given here). Parsing follows its
``parse_messages_from_completion_tokens(tokens, Role.ASSISTANT)`` and also
accepts a completion cut off by a token limit.

Every piece of text (role names, channel names, message content) is encoded
separately and as data, as ``openai-harmony`` does, so a control-token string
inside a message stays plain text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from gptoss_dist.tokenizer import Tokenizer

ReasoningEffort = Literal["low", "medium", "high"]

DEFAULT_MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
DEFAULT_KNOWLEDGE_CUTOFF = "2024-06"
VALID_CHANNELS = ("analysis", "commentary", "final")

START, MESSAGE, END, CHANNEL = "<|start|>", "<|message|>", "<|end|>", "<|channel|>"
CONSTRAIN = "<|constrain|>"
#: Tokens that close a message in a completion.
MESSAGE_ENDS = ("<|end|>", "<|return|>", "<|call|>")
#: A token after which a completion holds nothing more.
END_OF_TEXT = "<|endoftext|>"


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


def render_for_completion(
    messages: Sequence[Mapping[str, str]],
    tokenizer: Tokenizer,
    *,
    reasoning_effort: ReasoningEffort | None = "medium",
    current_date: str | None = None,
    knowledge_cutoff: str | None = DEFAULT_KNOWLEDGE_CUTOFF,
    model_identity: str | None = DEFAULT_MODEL_IDENTITY,
) -> list[int]:
    """Prompt ids for ``messages``, ending with the generation prompt ``<|start|>assistant``.

    Each message is a dict with ``role`` and ``content``. A first message with
    role ``system`` or ``developer`` holds the developer instructions (as in
    OpenAI's chat API); the harmony system message itself is always rendered
    from the keyword settings, where ``None`` leaves that line out. The other
    messages are ``user`` or ``assistant``; an assistant message may name its
    ``channel`` (default ``final``). As ``openai-harmony`` does, when the last
    assistant message is final, analysis messages before the first final one
    are dropped.
    """
    instructions, turns = _read_messages(messages)
    system = _system_text(reasoning_effort, current_date, knowledge_cutoff, model_identity)
    ids = _render(tokenizer, Message("system", system))
    if instructions is not None:
        ids += _render(tokenizer, Message("developer", f"# Instructions\n\n{instructions}"))
    for turn in _drop_old_analysis(turns):
        ids += _render(tokenizer, turn)
    return ids + [tokenizer.token_id(START), *tokenizer.encode("assistant")]


def parse_completion(tokens: Iterable[int], tokenizer: Tokenizer) -> dict[str, str]:
    """Text per channel (``analysis``, ``commentary``, ``final``) of a completion.

    The texts of several messages on one channel are joined by a blank line;
    a message without a channel is keyed by ``""``.
    """
    texts: dict[str, list[str]] = {}
    for message in parse_messages(tokens, tokenizer):
        texts.setdefault(message.channel or "", []).append(message.content)
    return {channel: "\n\n".join(parts) for channel, parts in texts.items()}


def parse_messages(tokens: Iterable[int], tokenizer: Tokenizer) -> list[Message]:
    """Messages of the completion ``tokens`` generated after a ``<|start|>assistant`` prompt.

    A message cut off in its content is kept with its text so far (as
    ``openai-harmony`` does), one cut off in its header is left out (where
    ``openai-harmony`` raises), and ``<|endoftext|>`` ends the completion.
    Raises ValueError on a token outside a message or a malformed header.
    """
    start, message = tokenizer.token_id(START), tokenizer.token_id(MESSAGE)
    ends = set(tokenizer.find_token_ids(MESSAGE_ENDS))
    stop = set(tokenizer.find_token_ids([END_OF_TEXT]))
    parsed: list[Message] = []
    state = "header"  # the prompt already opened an assistant message
    role: str | None = "assistant"
    header: list[int] = []
    body: list[int] = []
    for token in tokens:
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
            state = "start"
        else:
            body.append(token)
    if state == "content":
        parsed.append(_parse_message(tokenizer, header, role, body))
    return parsed


def _read_messages(messages: Sequence[Mapping[str, str]]) -> tuple[str | None, list[Message]]:
    """The developer instructions (if any) and the conversation turns of ``messages``."""
    instructions = None
    if messages and messages[0]["role"] in ("system", "developer"):
        instructions, messages = messages[0]["content"], messages[1:]
    turns = []
    for message in messages:
        role = message["role"]
        if role not in ("user", "assistant"):
            raise ValueError(f"message role {role!r}: want user or assistant (system or developer only first)")
        channel = message.get("channel", "final") if role == "assistant" else None
        if channel not in (None, *VALID_CHANNELS):
            raise ValueError(f"assistant channel {channel!r} is not one of {VALID_CHANNELS}")
        turns.append(Message(role, message["content"], channel))
    return instructions, turns


def _system_text(
    reasoning_effort: str | None,
    current_date: str | None,
    knowledge_cutoff: str | None,
    model_identity: str | None,
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
    sections.append(f"# Valid channels: {', '.join(VALID_CHANNELS)}. Channel must be included for every message.")
    return "\n\n".join(sections)


def _drop_old_analysis(turns: list[Message]) -> list[Message]:
    """``turns`` less the analysis messages that ``openai-harmony`` drops from a prompt."""
    assistant_channels = [turn.channel for turn in turns if turn.role == "assistant"]
    if not assistant_channels or assistant_channels[-1] != "final":
        return turns
    first_final = next(i for i, turn in enumerate(turns) if turn.channel == "final")
    return [turn for i, turn in enumerate(turns) if i >= first_final or turn.channel != "analysis"]


def _render(tokenizer: Tokenizer, message: Message) -> list[int]:
    """Ids of one message: ``<|start|>role[<|channel|>channel]<|message|>content<|end|>``."""
    ids = [tokenizer.token_id(START), *tokenizer.encode(message.role)]
    if message.channel is not None:
        ids += [tokenizer.token_id(CHANNEL), *tokenizer.encode(message.channel)]
    return ids + [tokenizer.token_id(MESSAGE), *tokenizer.encode(message.content), tokenizer.token_id(END)]


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
