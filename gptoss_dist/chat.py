"""`python -m gptoss_dist.chat`: a harmony chat in the terminal that shows each reply as it is generated.

    python -m gptoss_dist.chat --config=configs/gpt_oss_20b.py --config.checkpoint=gs://bucket/gpt-oss-20b \\
        --config.chat.system="Answer in one paragraph." --config.harmony.reasoning_effort=low

The model, mesh, dtype, lengths, `steps_per_call` (tokens per piece shown) and `sampling.*` come from the same
settings as the batch job's (`gptoss_dist.settings`); one conversation runs at a time. A reply's analysis
channel is shown dimmed (`chat.show_analysis`: "dim", "plain" or "hide"), its final channel plain, and only
its final message stays in the conversation, as harmony asks. `chat.raw=True` shows the completion as
generated instead, control tokens by name: for a model that does not write harmony, such as a random one.

`chat.tools` names a JSON file with a list of function tools, as a batch request's `tools`
(`gptoss_dist.records`). A reply that ends in a call of one is shown with the call, and the user is asked for the
tool's result, which goes back to the model as the tool's message for it to go on; Ctrl-C or Ctrl-D there drops
the call.

Ctrl-C during a reply stops it at the end of the current engine call and keeps the conversation, with the
final text so far; at the prompt, Ctrl-C or Ctrl-D ends the session. `/reset` starts a new conversation,
`/exit` ends the session. What the user types is data: a control-token string in it stays plain text. A
line that cannot be read or replied to (bytes that are not UTF-8, a lone surrogate) is said so, and the
session goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

import jax
import ml_collections

from gptoss_dist import records
from gptoss_dist.checkpoint import CheckpointError
from gptoss_dist.config import ConfigError
from gptoss_dist.engine import Engine, Request
from gptoss_dist.exit_codes import EXIT_CANNOT_START
from gptoss_dist.harmony import (
    MESSAGE,
    MESSAGE_ENDS,
    START,
    Tool,
    ToolCall,
    parse_messages,
    parse_reply,
    render_for_completion,
    tool_calls,
)
from gptoss_dist.paths import filesystem
from gptoss_dist.settings import SettingsError
from gptoss_dist.sharding import MeshError, mesh_shape
from gptoss_dist.startup import StartError, check_engine_settings, make_engine, planned_mesh
from gptoss_dist.tokenizer import Tokenizer, load_tokenizer

PROMPT = "you> "
STOPPED = "[stopped]"
TOOL_CALL = "[tool call]"
TOOL_RESULT_PROMPT = "{name} result> "  # asks for the result of a call of tool `name`
SHOW_ANALYSIS = ("dim", "plain", "hide")
DIM, UNDIM = "\x1b[2m", "\x1b[0m"
REPLACEMENT = "\ufffd"
# Control characters a model may write and a terminal would act on (escape sequences, carriage returns).
TERMINAL_CONTROLS = str.maketrans(
    {c: REPLACEMENT for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if chr(c) not in "\t\n"}
)


class ChatError(Exception):
    """A setting the chat cannot start with: the message names it."""


# ------------------------------------------------------------------------------------- reading a reply


class GrowingText:
    """The text of a growing token sequence in whole characters: a byte-level token can end inside a
    character, which decodes as U+FFFD until a later token completes it, so trailing U+FFFDs wait (and a
    sequence that ends in one, cut off, drops it)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.shown = 0  # characters handed out

    def add(self, tokens: Sequence[int]) -> str:
        """The text that `tokens` complete."""
        self.tokens += tokens
        text = self.text
        new, self.shown = text[self.shown :], max(self.shown, len(text))
        return new

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.tokens).rstrip(REPLACEMENT)


@dataclasses.dataclass(frozen=True)
class Piece:
    """New text of a reply's message number `message`, on `channel` (None: a header harmony cannot read)."""

    message: int
    channel: str | None
    text: str


class HarmonyReply:
    """Follows a harmony completion (generated after `<|start|>assistant`) as its tokens come: each message's
    channel and text, and the final channel's text. Tokens between messages other than `<|start|>` are
    skipped, as a reader that must not fail on a model's slip."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.start, self.message_start = tokenizer.token_id(START), tokenizer.token_id(MESSAGE)
        self.message_ends = set(tokenizer.find_token_ids(MESSAGE_ENDS))
        self.state = "header"  # the prompt opened the first message; then "content", then "between"
        self.header: list[int] = []
        self.messages = 0  # messages ended
        self.channel: str | None = None
        self.body = GrowingText(tokenizer)
        self.finals: list[str] = []

    @property
    def final(self) -> str:
        """The final channel's text, several messages joined by a blank line (as `parse_completion` does)."""
        return "\n\n".join(self.finals)

    def add(self, tokens: Sequence[int]) -> list[Piece]:
        """The text that `tokens` add, by message."""
        pieces: list[Piece] = []
        content: list[int] = []  # one decode per run of content tokens
        for token in tokens:
            if self.state == "content" and token not in self.message_ends:
                content.append(token)
                continue
            pieces += self._content(content)
            content = []
            self._structure(token)
        return pieces + self._content(content)

    def close(self) -> None:
        """Ends the message the completion stopped in, if it stopped in one (a length limit, Ctrl-C)."""
        if self.state == "content":
            self._end_message()

    def _content(self, tokens: list[int]) -> list[Piece]:
        text = self.body.add(tokens)
        return [Piece(self.messages, self.channel, text)] if text else []

    def _structure(self, token: int) -> None:
        if self.state == "content":  # `token` ends the message
            self._end_message()
        elif self.state == "header" and token == self.message_start:
            self.state, self.channel, self.body = "content", self._channel(), GrowingText(self.tokenizer)
        elif self.state == "header":
            self.header.append(token)
        elif token == self.start:
            self.state, self.header = "header", []

    def _end_message(self) -> None:
        if self.channel == "final":
            self.finals.append(self.body.text)
        self.state, self.messages = "between", self.messages + 1

    def _channel(self) -> str | None:
        try:
            return parse_messages([*self.header, self.message_start], self.tokenizer)[0].channel
        except ValueError:
            return None


class ReplyView:
    """Writes a reply to `out` as its tokens come: the final channel plain, the others dimmed (on a
    terminal), plain or hidden, a line break between messages; or, `raw`, the completion's text as it is."""

    def __init__(self, tokenizer: Tokenizer, out: TextIO, *, show_analysis: str, raw: bool):
        self.harmony = HarmonyReply(tokenizer)
        self.raw = GrowingText(tokenizer) if raw else None
        self.out, self.show_analysis = out, show_analysis
        self.dim = show_analysis == "dim" and out.isatty()
        self.message: int | None = None  # the message last shown
        self.tokens: list[int] = []  # the reply's tokens so far

    @property
    def final(self) -> str:
        return self.harmony.final

    def add(self, tokens: Sequence[int]) -> None:
        """Shows what `tokens` add."""
        self.tokens += tokens
        pieces = self.harmony.add(tokens)
        if self.raw is not None:
            self.out.write(self.raw.add(tokens).translate(TERMINAL_CONTROLS))
        else:
            for piece in pieces:
                self._show(piece)
        self.out.flush()

    def end(self, note: str = "") -> None:
        """Ends the reply, then shows `note` on a line of its own."""
        self.harmony.close()
        self.out.write(f"\n{note}\n" if note else "\n")
        self.out.flush()

    def _show(self, piece: Piece) -> None:
        aside = piece.channel != "final"
        if aside and self.show_analysis == "hide":
            return
        if self.message is not None and piece.message != self.message:
            self.out.write("\n")
        self.message = piece.message
        text = piece.text.translate(TERMINAL_CONTROLS)
        self.out.write(f"{DIM}{text}{UNDIM}" if aside and self.dim else text)


# ------------------------------------------------------------------------------------------- the chat


@contextlib.contextmanager
def ctrl_c_sets_event() -> Iterator[threading.Event]:
    """While open, Ctrl-C (SIGINT) sets the event it gives instead of raising KeyboardInterrupt, so that a
    reply stops between engine calls, never inside one."""
    pressed = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: pressed.set())
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)


class Chat:
    """One conversation with the model, each reply streamed to `out` as it is generated."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, config: ml_collections.ConfigDict,
                 out: TextIO = sys.stdout):  # fmt: skip
        self.engine, self.tokenizer, self.config, self.out = engine, tokenizer, config, out
        self.sampling, self.tools = check_settings(config)
        self.messages: list[dict[str, Any]] = []
        self.reset()

    def reset(self) -> None:
        """Starts a new conversation (with the configured developer instructions)."""
        system = self.config.chat.system
        self.messages = [{"role": "system", "content": system}] if system else []

    def session(self, read_line: Callable[[str], str] = input) -> None:
        """Replies to each line read until /exit, or Ctrl-D or Ctrl-C at the prompt."""
        self.out.write("Ctrl-C stops a reply; /reset starts a new conversation; /exit or Ctrl-D leaves.\n")
        while True:
            try:
                line = read_line(PROMPT)
            except (EOFError, KeyboardInterrupt):
                self.out.write("\n")
                return
            except UnicodeDecodeError as err:  # the terminal sent bytes that are not UTF-8
                self.out.write(f"(cannot read that line: {err})\n")
                continue
            command = line.strip()
            if command == "/exit":
                return
            if command == "/reset":
                self.reset()
                self.out.write("(a new conversation)\n")
            elif command:
                self.reply(line, read_line)

    def reply(self, text: str, read_line: Callable[[str], str] = input) -> None:
        """Streams the model's reply to the user's `text` and keeps its final message; while the reply calls
        a tool, asks `read_line` for the tool's result and streams the reply to that."""
        message: dict[str, Any] | None = {"role": "user", "content": text}
        while message is not None:
            message = self.answer(message, read_line)

    def answer(self, message: dict[str, Any], read_line: Callable[[str], str]) -> dict[str, Any] | None:
        """Streams the reply to `message` (the user's or a tool's); returns the tool's message if the reply
        calls a tool and the user gives its result, else keeps the reply's final message."""
        self.messages.append(message)
        try:
            records.check_text(message["content"], "the line")
            request = self.request()
        except Exception as err:  # noqa: BLE001  a line that does not fit the context, or cannot be tokenized
            self.messages.pop()
            self.out.write(f"(cannot reply: {records.error_message(err)}; /reset starts a new conversation)\n")
            return None
        view = ReplyView(self.tokenizer, self.out, show_analysis=self.config.chat.show_analysis,
                         raw=self.config.chat.raw)  # fmt: skip
        completed = self.show_reply(request, view)
        view.end("" if completed else STOPPED)
        call, analysis = self.ended_call(view.tokens) if completed else (None, None)
        if call is not None:
            return self.call_tool(call, analysis, read_line)
        if view.final:
            self.messages.append({"role": "assistant", "content": view.final, "channel": "final"})
        return None

    def ended_call(self, tokens: list[int]) -> tuple[ToolCall | None, str | None]:
        """The function call that a reply ends with, if any, and the reply's analysis before it."""
        try:
            messages, call = parse_reply(tokens, self.tokenizer)
        except ValueError:  # not valid harmony: no call
            return None, None
        calls = tool_calls([call] if call is not None else [])
        analysis = [m.content for m in messages if m.channel == "analysis"]
        return (calls[0] if calls else None), ("\n\n".join(analysis) or None)

    def call_tool(self, call: ToolCall, analysis: str | None, read_line: Callable[[str], str]) -> dict[str, Any] | None:
        """Shows the reply's call and asks the user for the tool's result: the tool's message, with the call
        kept in the conversation; None, the call dropped, for a tool not declared or a result not given."""
        self.out.write(f"{TOOL_CALL} {call.name} {call.arguments}\n".translate(TERMINAL_CONTROLS))
        if call.name not in [tool.name for tool in self.tools]:
            self.out.write(f"(no tool {call.name!r} is declared: the call is dropped)\n")
            return None
        try:
            result = records.check_text(read_line(TOOL_RESULT_PROMPT.format(name=call.name)), "the result")
        except (EOFError, KeyboardInterrupt):
            note = "no result"
        except ValueError as err:  # bytes that are not UTF-8 (a UnicodeDecodeError), a lone surrogate
            note = f"cannot read that result: {err}"
        else:
            self.messages.append({"role": "assistant", "content": analysis, "tool_calls": [dataclasses.asdict(call)]})
            return {"role": "tool", "name": call.name, "content": result}
        self.out.write(f"\n({note}; the call is dropped)\n")
        return None

    def request(self) -> Request:
        """The engine's request for the conversation so far; ValueError if it cannot run."""
        harmony, sampling = self.config.harmony, self.sampling
        prompt = render_for_completion(self.messages, self.tokenizer, tools=self.tools,
                                       reasoning_effort=harmony.reasoning_effort,
                                       current_date=harmony.current_date or None)  # fmt: skip
        request = Request(prompt, max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                          top_k=sampling.top_k, top_p=sampling.top_p, seed=sampling.seed)  # fmt: skip
        self.engine.validate(request)
        return request

    def show_reply(self, request: Request, view: ReplyView) -> bool:
        """Shows the reply as it is generated; False if Ctrl-C stopped it."""
        with ctrl_c_sets_event() as pressed, contextlib.closing(self.engine.stream([request])) as updates:
            for update in updates:
                view.add(update.tokens)
                if pressed.is_set():
                    return False
        return True


def check_settings(config: ml_collections.ConfigDict) -> tuple[records.Sampling, tuple[Tool, ...]]:
    """The sampling defaults and the tools, once the chat's settings are checked; ChatError or StartError naming
    one it cannot start with."""
    if config.chat.show_analysis not in SHOW_ANALYSIS:
        raise ChatError(f"chat.show_analysis must be one of {SHOW_ANALYSIS}, not {config.chat.show_analysis!r}")
    tools = read_tools(config.chat.tools)
    return check_engine_settings(config), tools


def read_tools(path: str) -> tuple[Tool, ...]:
    """The function tools in the JSON file at `path` ("": none); ChatError naming the file if it cannot be read
    or a tool in it is not valid."""
    if not path:
        return ()
    try:
        return records.parse_tools(json.loads(filesystem(path).cat_file(path)))
    except (OSError, ValueError) as err:  # a missing or unreadable file, JSON or a tool that is not valid
        raise ChatError(f"chat.tools: {path}: {err}") from None


def open_chat(config: ml_collections.ConfigDict) -> Chat:
    """The checkpoint's model in an engine for one conversation (a slot per data shard), and its tokenizer."""
    check_settings(config)
    config.max_slots = mesh_shape(config.mesh, jax.device_count())["data"]
    mesh = planned_mesh(config, None)
    tokenizer = load_tokenizer(config.checkpoint)
    return Chat(make_engine(config, tokenizer, mesh), tokenizer, config)


def main(argv: Sequence[str] | None = None) -> None:
    from absl import app
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, "A run config (configs/*.py).", lock_config=True)

    def run(_):
        try:
            chat = open_chat(config.value)
        except (ChatError, StartError, SettingsError, CheckpointError, ConfigError, MeshError) as err:
            print(f"gptoss-chat: error: {err}", file=sys.stderr)
            sys.exit(EXIT_CANNOT_START)
        chat.session()

    app.run(run, argv=list(argv) if argv is not None else None)


if __name__ == "__main__":
    main()
