"""The terminal chat (gptoss_dist.chat): a reply is shown channel by channel as its tokens come, whole
characters only; the conversation keeps the final messages; and the command, driven through a
pseudo-terminal against a tiny random checkpoint, streams its replies and survives Ctrl-C.
"""

from __future__ import annotations

import io
import itertools
import json
import re
import runpy
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

from gptoss_dist import records, settings
from gptoss_dist.chat import (
    DIM,
    PROMPT,
    STOPPED,
    TOOL_CALL,
    TOOL_RESULT_PROMPT,
    UNDIM,
    Chat,
    ChatError,
    ReplyView,
    check_settings,
)
from gptoss_dist.engine import Request, Update
from gptoss_dist.harmony import render_for_completion
from gptoss_dist.random_checkpoint import byte_level_tokenizer, write_random_checkpoint
from gptoss_dist.tokenizer import STOP_TOKENS, TOKENIZER_FILE, Tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "tiny.py"
TOKENIZER = Tokenizer(byte_level_tokenizer())


def completion(*parts: str) -> list[int]:
    """Ids of a completion: `<|...|>` parts are control tokens, the others text."""
    return [
        i for part in parts for i in ([TOKENIZER.token_id(part)] if part.startswith("<|") else TOKENIZER.encode(part))
    ]


ANALYSIS, FINAL = "Thinking… ", "Héllo 🙂 <\x1b[31m>"  # multi-byte characters, a terminal escape
COMPLETION = completion(
    "<|channel|>", "analysis", "<|message|>", ANALYSIS, "<|end|>",
    "<|start|>", "assistant", "<|channel|>", "final", "<|message|>", FINAL, "<|return|>",
)  # fmt: skip
FINAL_SHOWN = "Héllo 🙂 <\ufffd[31m>"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def shown(tokens: list[int], chunk: int, out: io.StringIO | None = None, **view) -> str:
    """What a reply view writes for `tokens` given `chunk` at a time, dim runs merged."""
    out = out if out is not None else Terminal()
    reply = ReplyView(TOKENIZER, out, **({"show_analysis": "dim", "raw": False} | view))
    for start in range(0, len(tokens), chunk):
        reply.add(tokens[start : start + chunk])
    reply.end()
    return out.getvalue().replace(UNDIM + DIM, "")


@pytest.mark.parametrize("chunk", [1, 3, len(COMPLETION)])
def test_reply_shows_analysis_dimmed_and_final_plain_in_whole_characters(chunk):
    assert shown(COMPLETION, chunk) == f"{DIM}{ANALYSIS}{UNDIM}\n{FINAL_SHOWN}\n"
    assert shown(COMPLETION, chunk, show_analysis="hide") == f"{FINAL_SHOWN}\n"
    assert shown(COMPLETION, chunk, show_analysis="plain") == f"{ANALYSIS}\n{FINAL_SHOWN}\n"
    assert shown(COMPLETION, chunk, io.StringIO()) == f"{ANALYSIS}\n{FINAL_SHOWN}\n"  # not a terminal: no escapes
    raw = TOKENIZER.decode(COMPLETION).replace("\x1b", "\ufffd")
    assert shown(COMPLETION, chunk, raw=True) == f"{raw}\n"


def test_reply_cut_off_keeps_its_whole_characters():
    final_starts = COMPLETION.index(TOKENIZER.token_id("<|message|>"), 10) + 1
    cut = COMPLETION[: final_starts + 2]  # "H" and the first of "é"'s two bytes
    out = Terminal()
    reply = ReplyView(TOKENIZER, out, show_analysis="hide", raw=False)
    reply.add(cut)
    assert out.getvalue() == "H"
    reply.end(STOPPED)
    assert out.getvalue() == f"H\n{STOPPED}\n" and reply.final == "H"


class ScriptedEngine:
    """Stands in for the engine: answers the requests with `completions` in turn, the last one from then on,
    three tokens an update."""

    def __init__(self, interrupt_after: int | None = None, completions: tuple[list[int], ...] = (COMPLETION,)):
        self.requests: list[Request] = []
        self.interrupt_after = interrupt_after  # updates after which Ctrl-C is pressed
        self.completions = completions

    def validate(self, request: Request) -> None:
        pass

    def stream(self, requests: list[Request]) -> Iterator[Update]:
        (request,) = requests
        self.requests.append(request)
        tokens = self.completions[min(len(self.requests), len(self.completions)) - 1]
        for n, start in enumerate(range(0, len(tokens), 3)):
            if n == self.interrupt_after:  # to this thread: os.kill may wake another, late under load
                signal.raise_signal(signal.SIGINT)
            yield Update(request, tokens[start : start + 3])


def chat_config(**chat):
    config = runpy.run_path(str(TINY_CONFIG))["get_config"]()
    config.checkpoint, config.chat.system, config.harmony.reasoning_effort = "unused", "Be brief.", "low"
    config.chat.update(chat)
    return config


def chat_with(engine: ScriptedEngine, **chat) -> tuple[Chat, io.StringIO]:
    config = chat_config(**chat)
    out = io.StringIO()
    return Chat(engine, TOKENIZER, config, out), out


def test_conversation_keeps_the_final_messages():
    engine = ScriptedEngine()
    chat, out = chat_with(engine)
    chat.reply("Hi <|start|>")
    chat.reply("And?")
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi <|start|>"},
        {"role": "assistant", "content": FINAL, "channel": "final"},
        {"role": "user", "content": "And?"},
    ]
    assert engine.requests[1].prompt == render_for_completion(conversation, TOKENIZER, reasoning_effort="low")
    assert out.getvalue() == f"{ANALYSIS}\n{FINAL_SHOWN}\n" * 2
    chat.reset()
    chat.reply("Again")
    assert engine.requests[2].prompt == render_for_completion([*conversation[:1], {"role": "user", "content": "Again"}],
                                                              TOKENIZER, reasoning_effort="low")  # fmt: skip


def test_ctrl_c_stops_the_reply_and_keeps_the_final_text_so_far():
    final_starts = COMPLETION.index(TOKENIZER.token_id("<|message|>"), 10) + 1
    engine = ScriptedEngine(interrupt_after=final_starts // 3 + 2)  # a few tokens into the final message
    chat, out = chat_with(engine)
    at_the_prompt = signal.getsignal(signal.SIGINT)  # Python's default; ignored under a pytest-xdist worker
    chat.reply("Hi")
    assert out.getvalue().endswith(f"\n{STOPPED}\n")
    kept = chat.messages[-1]
    assert kept["role"] == "assistant" and kept["content"] and FINAL.startswith(kept["content"])
    assert signal.getsignal(signal.SIGINT) is at_the_prompt  # Ctrl-C does at the prompt what it did before


def test_a_line_that_cannot_be_read_or_replied_to_is_said_and_the_session_goes_on():
    engine = ScriptedEngine()
    chat, out = chat_with(engine)
    lines = iter([b"caf\xe9", "a\udc80b", "Hi", "/exit"])

    def read_line(_prompt: str) -> str:  # as input() does: bytes the terminal's encoding cannot decode raise
        line = next(lines)
        return line.decode() if isinstance(line, bytes) else line

    chat.session(read_line)
    shown = out.getvalue()
    assert "(cannot read that line: 'utf-8' codec can't decode byte 0xe9 in position 3" in shown
    assert '(cannot reply: the line is not valid text: a lone surrogate "\\udc80" at 1; /reset' in shown
    assert [m["content"] for m in chat.messages if m["role"] == "user"] == ["Hi"] and len(engine.requests) == 1


TOOLS = [
    {"type": "function", "name": "get_weather", "description": "The weather in a city.",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
]  # fmt: skip
ARGUMENTS = '{"city": "Paris"}'
CALL = completion(
    "<|channel|>", "analysis", "<|message|>", "Need the weather.", "<|end|>", "<|start|>", "assistant",
    "<|channel|>", "commentary to=functions.get_weather ", "<|constrain|>", "json", "<|message|>", ARGUMENTS,
    "<|call|>",
)  # fmt: skip


@pytest.fixture
def tools_file(tmp_path) -> str:
    path = tmp_path / "tools.json"
    path.write_text(json.dumps(TOOLS))
    return str(path)


def scripted_session(chat: Chat, lines: list[str]) -> list[str]:
    """Runs a session on `lines`; returns the prompts it showed."""
    prompts, answers = [], iter([*lines, "/exit"])

    def read_line(prompt: str) -> str:
        prompts.append(prompt)
        return next(answers)

    chat.session(read_line)
    return prompts


def test_a_tool_call_is_shown_and_its_result_asked_for_and_given_back(tools_file):
    engine = ScriptedEngine(completions=(CALL, COMPLETION))
    chat, out = chat_with(engine, tools=tools_file)
    assert scripted_session(chat, ["Weather in Paris?", "Sunny <|end|>"]) == [
        PROMPT, TOOL_RESULT_PROMPT.format(name="get_weather"), PROMPT,
    ]  # fmt: skip
    assert f"{TOOL_CALL} get_weather {ARGUMENTS}\n" in out.getvalue()
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Need the weather.",
         "tool_calls": [{"name": "get_weather", "arguments": ARGUMENTS}]},
        {"role": "tool", "name": "get_weather", "content": "Sunny <|end|>"},
    ]  # fmt: skip
    tools = records.parse_tools(TOOLS)
    assert engine.requests[1].prompt == render_for_completion(conversation, TOKENIZER, tools=tools,
                                                              reasoning_effort="low")  # fmt: skip
    assert chat.messages == [*conversation, {"role": "assistant", "content": FINAL, "channel": "final"}]


def test_a_call_without_a_result_is_dropped(tools_file):
    engine = ScriptedEngine(completions=(CALL,))
    chat, out = chat_with(engine, tools=tools_file)

    def read_line(prompt: str) -> str:
        if prompt != PROMPT:
            raise EOFError
        return "Weather?" if not engine.requests else "/exit"

    chat.session(read_line)
    assert "(no result; the call is dropped)" in out.getvalue()
    assert chat.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}]
    assert len(engine.requests) == 1


@pytest.mark.parametrize(
    "content, error",
    [(None, "chat.tools: {path}: "), ("[1]", 'tools[0] must be an object with "type": "function"'), ("{", "Expecting")],
)
def test_a_tools_file_that_cannot_be_read_is_refused_naming_it(tmp_path, content, error):
    path = tmp_path / "tools.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ChatError, match=re.escape(error.format(path=path))):
        check_settings(chat_config(tools=str(path)))


# ------------------------------------------------------------------------------------------ the command


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random checkpoint whose tokenizer has no stop tokens, so that each reply runs to
    max_new_tokens: long enough to see its pieces and to stop it with Ctrl-C."""
    model = settings.model_config(runpy.run_path(str(TINY_CONFIG))["get_config"]())
    directory = write_random_checkpoint(tmp_path_factory.mktemp("chat") / "tiny-hf", model, seed=3)
    path = directory / TOKENIZER_FILE
    spec = json.loads(path.read_text())
    for token in spec["added_tokens"]:
        if token["content"] in STOP_TOKENS:
            token["content"] = token["content"].replace("|>", "-renamed|>")
    path.write_text(json.dumps(spec))
    return directory


def read_reply(child: pexpect.spawn, line: str, *, interrupt: bool = False) -> list[str]:
    """Sends `line` and reads up to the next prompt; returns the reply's text as the reads brought it. With
    `interrupt`, Ctrl-C goes as soon as some of the reply has come."""
    child.sendline(line)
    echo, end = f"{line}\r\n", f"\r\n{PROMPT}"
    text, read_ends = "", []
    while not text.endswith(end):
        text += child.read_nonblocking(4096, timeout=120)
        read_ends.append(len(text))
        if interrupt and echo in text and not text.endswith(echo):
            child.sendintr()
            interrupt = False
    first, last = text.index(echo) + len(echo), len(text) - len(PROMPT)
    bounds = [first] + [n for n in read_ends if first < n < last] + [last]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def test_chat_command_streams_replies_and_survives_ctrl_c(checkpoint):
    command = [f"--config={TINY_CONFIG}", f"--config.checkpoint={checkpoint}", "--config.chat.raw=True",
               "--config.sampling.max_new_tokens=300", "--config.steps_per_call=2", "--config.min_prefill_len=512"]  # fmt: skip
    # preexec_fn: a test run started in the background inherits an ignored SIGINT, which Ctrl-C needs
    child = pexpect.spawn(sys.executable, ["-m", "gptoss_dist.chat", *command], cwd=str(ROOT),
                          encoding="utf-8", codec_errors="replace", timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        child.expect_exact(PROMPT)
        for line in ("Hello there", "Tell me <|start|> more"):
            reads = read_reply(child, line)
            assert len(reads) >= 3, reads  # the reply came in pieces
            assert STOPPED not in "".join(reads)
        reads = read_reply(child, "A long story, please", interrupt=True)
        assert "".join(reads).endswith(f"\r\n{STOPPED}\r\n"), reads
        reads = read_reply(child, "Still there?")
        assert len(reads) >= 3 and STOPPED not in "".join(reads)
        # At the prompt the session ends. A Ctrl-C that lands between the prompt's write and the blocking read
        # is held until a line comes (CPython checks signals only when the read is interrupted); a person's
        # finds the read waiting, as this one does after a pause.
        time.sleep(1)
        child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
