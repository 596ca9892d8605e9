"""The batch job (gptoss-generate): JSONL in and out, locally and on GCS (a real GCS API on loopback). Greedy
results equal transformers' generate; bad records go to the errors while the rest complete; stop strings cut
completions; a job killed with SIGKILL and started again writes every record exactly once.

Every job here runs with the same slots, length and steps, so the compiled steps are shared; jobs run as
subprocesses load them from the run's persistent compilation cache.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
from job_fixtures import ROOT, by_id, by_sample, cli, job_config, read_output, run, run_cli, write_jsonl
from reference import load_reference
from tokenizer_fixtures import encode_with_control_tokens

from gptoss_dist import from_pretrained, job_files, paths, records
from gptoss_dist.engine import Engine, Request, Result, TokenLogprob
from gptoss_dist.generate import cut_at_stop_strings, make_request, result_record, stop_ids
from gptoss_dist.harmony import Tool, render_for_completion
from gptoss_dist.paths import filesystem
from gptoss_dist.random_checkpoint import (
    BYTE_TOKENIZER_SIZE,
    CONTROL_TOKENS,
    write_byte_tokenizer,
)
from gptoss_dist.startup import StartError
from gptoss_dist.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer

pytest_plugins = ["gcs_emulator", "tokenizer_fixtures", "job_fixtures"]

TEXTS = ["Hello", "The sky is", "1, 2, 3,", "<|start|>user", "naïve café"]  # <|start|>: text, 9 byte tokens
CONVERSATIONS = [
    [{"role": "user", "content": "Write one line about the sea, please, in English."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "Tell me a joke about cats."},
        {"role": "assistant", "content": "No.", "channel": "final"},
        {"role": "user", "content": "Please?"},
    ],
]


@pytest.fixture(scope="module")
def tokenizer(hf_checkpoint) -> Tokenizer:
    return load_tokenizer(hf_checkpoint)


# ------------------------------------------------------------------------------------- the byte tokenizer


def test_random_checkpoint_has_a_byte_tokenizer_that_keeps_text_as_data(hf_checkpoint, tokenizer, tmp_path):
    assert tokenizer.vocab_size == BYTE_TOKENIZER_SIZE == 256 + len(CONTROL_TOKENS)
    assert [tokenizer.token_id(name) for name in CONTROL_TOKENS] == list(range(256, BYTE_TOKENIZER_SIZE))
    assert tokenizer.stop_token_ids == tuple(map(tokenizer.token_id, ("<|return|>", "<|endoftext|>", "<|call|>")))
    text = "naïve <|start|>user 🙂\n"
    assert tokenizer.encode(text) == list(text.encode())
    assert tokenizer.decode(tokenizer.encode(text)) == text
    with pytest.raises(ValueError, match="vocabulary of 128 ids cannot hold the byte tokenizer's 265"):
        write_byte_tokenizer(tmp_path, 128)


def test_random_checkpoint_with_a_small_vocabulary_has_no_tokenizer(small_checkpoint):
    assert not (small_checkpoint / TOKENIZER_FILE).exists()


# ------------------------------------------------------------------------------------------- end to end


def fifty_requests() -> list[dict[str, Any]]:
    """Plain text, conversations and token ids in turn, some greedy, most sampled (transformers checks the
    greedy ones, a request at a time, which takes a while)."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(47):
        line: dict[str, Any] = {"id": f"r{i:02d}"}
        kind = i % 3
        if kind == 0:
            line["prompt"] = TEXTS[i // 3 % len(TEXTS)]
        elif kind == 1:
            line["messages"] = CONVERSATIONS[i // 3 % len(CONVERSATIONS)]
            if i % 4 == 1:
                line["reasoning_effort"] = ("low", "high")[i // 4 % 2]
        else:
            line["prompt_tokens"] = rng.integers(0, BYTE_TOKENIZER_SIZE, rng.integers(1, 17)).tolist()
        if i % 8 >= 3:
            line |= {"temperature": (0.7, 1.0, 1.3)[i % 3], "top_p": 0.9 if i % 5 == 1 else 1.0,
                     "top_k": 50 if i % 7 == 1 else 0, "seed": i}  # fmt: skip
        if i % 5 == 0:
            line["max_new_tokens"] = 4 + i % 8
        lines.append(line)
    twin = {"prompt": "The sky is", "temperature": 1.0, "top_k": 40, "seed": 7}
    return [*lines, {"id": "twin-a"} | twin, {"id": "twin-b"} | twin, {"id": "other-seed"} | twin | {"seed": 8}]


def expected_prompt(line: dict[str, Any], tokenizer: Tokenizer) -> list[int]:
    if "prompt" in line:
        return tokenizer.encode(line["prompt"])
    if "messages" in line:
        return render_for_completion(
            line["messages"], tokenizer, reasoning_effort=line.get("reasoning_effort", "medium")
        )
    return line["prompt_tokens"]


@pytest.fixture(scope="module")
def fifty(converted, tmp_path_factory):
    """The fifty requests and the summary and results of a job over them, from the converted checkpoint."""
    directory = tmp_path_factory.mktemp("fifty")
    lines = fifty_requests()
    summary = run(job_config(converted, write_jsonl(directory / "in.jsonl", lines), directory / "out"))
    return lines, summary, by_id(read_output(directory / "out", job_files.RESULTS))


def hf_greedy(model, prompt: list[int], max_new_tokens: int, stop: tuple[int, ...]) -> list[int]:
    import torch

    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=list(stop), pad_token_id=stop[0])  # fmt: skip
    return out[0, len(prompt) :].tolist()


def test_fifty_requests_end_to_end_greedy_ones_equal_transformers(fifty, hf_checkpoint, tokenizer):
    lines, summary, results = fifty
    assert (summary.ok, summary.failed, summary.exit_code) == (50, 0, 0)
    assert summary.tokens == sum(r["usage"]["completion_tokens"] for r in results.values())
    assert sorted(results) == sorted(line["id"] for line in lines)
    reference = load_reference(hf_checkpoint)
    stop = tokenizer.stop_token_ids
    for line in lines:
        result, prompt = results[line["id"]], expected_prompt(line, tokenizer)
        max_new = line.get("max_new_tokens", 12)
        tokens = result["tokens"]
        assert result["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(tokens)}
        assert 1 <= len(tokens) <= max_new
        stopped = tokens[-1] in stop
        assert result["finish_reason"] == ("stop" if stopped else "length")
        assert result["text"] == tokenizer.decode(tokens[:-1] if stopped else tokens)
        assert ("analysis" in result and "final" in result) == ("messages" in line)
        if "temperature" not in line:
            assert tokens == hf_greedy(reference, prompt, max_new, stop), line["id"]
    assert results["twin-a"]["tokens"] == results["twin-b"]["tokens"] != results["other-seed"]["tokens"]


def test_stop_strings_and_stop_ids_end_completions(fifty, converted, tokenizer, tmp_path):
    """Greedy completions run again with a stop string or id taken from them end where it first appears."""
    lines, _, results = fifty

    def usable(line, result) -> bool:  # greedy, 12 tokens, text to take stop strings from
        free_run = "prompt" in line and "temperature" not in line and "max_new_tokens" not in line
        text = result["text"]
        return free_run and result["finish_reason"] == "length" and len(text) >= 6 and any(map(str.isascii, text[2:]))

    free = [(line, results[line["id"]]) for line in lines if usable(line, results[line["id"]])][:3]
    assert len(free) >= 2
    requests = []
    for n, (line, result) in enumerate(free):
        text = result["text"]
        requests += [
            {"id": f"{n}-string", "prompt": line["prompt"], "stop": ["never appears", text[3:6]]},
            {"id": f"{n}-char", "prompt": line["prompt"], "stop": next(c for c in text[2:] if c.isascii())},
            {"id": f"{n}-id", "prompt": line["prompt"], "stop": [result["tokens"][4]]},
        ]
    run(job_config(converted, write_jsonl(tmp_path / "in.jsonl", requests), tmp_path / "out"))
    stopped = by_id(read_output(tmp_path / "out", job_files.RESULTS))
    for n, (_, free_run) in enumerate(free):
        text, tokens = free_run["text"], free_run["tokens"]
        for kind, stop in (("string", text[3:6]), ("char", requests[3 * n + 1]["stop"])):
            result = stopped[f"{n}-{kind}"]
            assert result["finish_reason"] == "stop"
            assert result["text"] == text[: text.find(stop)]
            assert result["tokens"] == tokens[: len(result["tokens"])]
            assert stop in tokenizer.decode(result["tokens"]) and stop not in tokenizer.decode(result["tokens"][:-1])
        result = stopped[f"{n}-id"]
        end = tokens.index(tokens[4]) + 1
        assert (result["tokens"], result["finish_reason"]) == (tokens[:end], "stop")
        assert result["text"] == tokenizer.decode(tokens[: end - 1])


def test_requests_carry_their_settings_and_stop_ids(hf_checkpoint, tokenizer, tmp_path):
    engine = Engine(from_pretrained(hf_checkpoint, dtype=jnp.float32), max_slots=4, max_len=640)  # runs nothing
    config = job_config(
        hf_checkpoint, tmp_path / "in.jsonl", tmp_path / "out", **{"harmony.current_date": "2025-06-28"}
    )
    defaults = records.sampling_defaults(config.sampling)

    def request_of(line: dict[str, Any]) -> Request:
        return make_request(records.parse_record(1, json.dumps(line), defaults), tokenizer, engine, config.harmony)

    line = {"id": "a", "prompt": "Hi", "max_new_tokens": 5, "temperature": 0.5, "top_p": 0.8, "top_k": 7, "seed": 9,
            "stop": ["x", "xy", 3], "logprobs": True, "top_logprobs": 2, "prompt_logprobs": True}  # fmt: skip
    assert request_of(line) == Request(tokenizer.encode("Hi"), 5, 0.5, 7, 0.8, 9, stop=[3, ord("x")], id="a",
                                       logprobs=True, top_logprobs=2, prompt_logprobs=True)  # fmt: skip
    messages = CONVERSATIONS[1]
    rendered = render_for_completion(messages, tokenizer, reasoning_effort="low", current_date="2025-06-28")
    request = request_of({"id": "b", "messages": messages, "reasoning_effort": "low"})
    assert request == Request(rendered, max_new_tokens=12, stop=[], id="b")
    call = {"role": "assistant", "tool_calls": [{"name": "f", "arguments": "{}"}]}
    messages = [USER, call, {"role": "tool", "name": "f", "content": "done"}]
    rendered = render_for_completion(messages, tokenizer, tools=[Tool("f", "Does f.", TOOL_SPEC["parameters"])],
                                     current_date="2025-06-28")  # fmt: skip
    assert request_of({"id": "c", "messages": messages, "tools": [TOOL]}).prompt == rendered


def test_real_tokenizer_stop_strings_of_one_token_become_ids_and_others_cut_the_text(real_tokenizer):
    defaults = records.Sampling(max_new_tokens=8, temperature=0.0, top_p=1.0, top_k=0, seed=0)
    record = records.parse_record(
        1, json.dumps({"id": "a", "prompt": "x", "stop": ["\n\n", " world", "Hello world", 7]}), defaults
    )
    assert stop_ids(record, real_tokenizer, 201088) == [
        7,
        real_tokenizer.encode("\n\n")[0],
        real_tokenizer.encode(" world")[0],
    ]
    tokens = real_tokenizer.encode("Hello world, and goodbye world.")
    kept, text, reason = cut_at_stop_strings(tokens, "length", [", and", "bye"], real_tokenizer)
    assert (text, reason) == ("Hello world", "stop")
    assert real_tokenizer.decode(kept) == "Hello world, and"


# ---------------------------------------------------------------------------------------------- bad input

BAD_LINES = {  # line -> (id, part of the error)
    2: (None, "not valid JSON"),
    3: (None, "missing id"),
    4: ("ok-1", "duplicate id 'ok-1', first on line 1"),
    5: ("unknown", "unknown field(s) temprature"),
    6: ("too-long", "prompt of 400 tokens leaves no room in a context of 384"),
    7: ("negative", "max_new_tokens must be an integer in [1, 2**31), not -3"),
    8: ("cold", "temperature must be a number >= 0, not -0.5"),
    10: ("top-p", "top_p must be a number in (0, 1], not 0"),
    11: ("two-prompts", "need exactly one of prompt, messages, prompt_tokens, got prompt, prompt_tokens"),
    12: ("big-stop", "stop token id 9999 is not in the vocabulary [0, 512)"),
    13: ("tool-role", "a tool message names tool None, which is not declared (tools: none)"),
    14: (None, "not a JSON object but list"),
    15: (None, "id must be a non-empty string, not 15"),
    16: ("ids", "prompt token ids must be in [0, 512)"),
    18: ("tools-object", "tools must be a list of function tools"),
    19: ("nameless-tool", "tools[1] needs a name"),
    20: ("twin-tools", "tools: duplicate tool name(s) 'f'"),
    21: ("undeclared-tool", "a tool message names tool 'g', which is not declared (tools: f)"),
    22: ("bad-schema", "tool 'f': parameters property 'x': oneOf is not supported"),
    23: ("top-21", "top_logprobs must be an integer in [0, 20], not 21"),
}
TOOL_SPEC = {"name": "f", "description": "Does f.", "parameters": {"type": "object", "properties": {}}}
TOOL = {"type": "function"} | TOOL_SPEC
DEFAULTS = records.Sampling(max_new_tokens=8, temperature=0.0, top_p=1.0, top_k=0, seed=0)
USER = {"role": "user", "content": "Hi"}


def test_bad_records_go_to_the_errors_and_the_rest_complete(converted, tmp_path):
    lines = [
        {"id": "ok-1", "prompt": "Hello"},
        '{"id": "broken", "prompt": ',
        {"prompt": "Hello"},
        {"id": "ok-1", "prompt": "again"},
        {"id": "unknown", "prompt": "Hello", "temprature": 1.0},
        {"id": "too-long", "prompt_tokens": [1] * 400},
        {"id": "negative", "prompt": "Hello", "max_new_tokens": -3},
        {"id": "cold", "prompt": "Hello", "temperature": -0.5},
        {"id": "ok-2", "prompt_tokens": [1, 2, 3], "temperature": 0.5},
        {"id": "top-p", "prompt": "Hello", "top_p": 0},
        {"id": "two-prompts", "prompt": "Hello", "prompt_tokens": [1]},
        {"id": "big-stop", "prompt": "Hello", "stop": [9999]},
        {"id": "tool-role", "messages": [{"role": "tool", "content": "42"}]},
        "[1, 2]",
        {"id": 15, "prompt": "Hello"},
        {"id": "ids", "prompt_tokens": [1, 600]},
        "",
        {"id": "tools-object", "messages": [USER], "tools": TOOL},
        {"id": "nameless-tool", "messages": [USER], "tools": [TOOL, {"type": "function", "description": "x"}]},
        {"id": "twin-tools", "messages": [USER], "tools": [TOOL, {"type": "function", "function": TOOL_SPEC}]},
        {"id": "undeclared-tool", "messages": [USER, {"role": "tool", "name": "g", "content": "1"}], "tools": [TOOL]},
        {
            "id": "bad-schema",
            "messages": [USER],
            "tools": [TOOL | {"parameters": {"type": "object", "properties": {"x": {"oneOf": []}}}}],
        },
        {"id": "top-21", "prompt": "Hello", "logprobs": True, "top_logprobs": 21},
    ]
    config = job_config(converted, write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out")
    summary = run(config)
    assert (summary.ok, summary.failed, summary.exit_code) == (2, len(BAD_LINES), 1)
    assert sorted(by_id(read_output(tmp_path / "out", job_files.RESULTS))) == ["ok-1", "ok-2"]
    errors = read_output(tmp_path / "out", job_files.ERRORS)
    assert [e["line"] for e in errors] == sorted(BAD_LINES)
    for error in errors:
        expected_id, message = BAD_LINES[error["line"]]
        assert error["id"] == expected_id and message in error["error"], error
    # Started again, the job finds everything done and still reports the failures.
    before = {name: (tmp_path / "out" / f"{name}.jsonl").read_bytes() for name in (job_files.RESULTS, job_files.ERRORS)}
    again = run(config)
    assert (again.ok, again.failed, again.done_before, again.exit_code) == (0, 0, len(lines) - 1, 1)
    assert before == {name: (tmp_path / "out" / f"{name}.jsonl").read_bytes() for name in before}


@pytest.mark.parametrize(
    "record, message",
    [
        ({"id": "a", "prompt": "x", "top_k": True}, "top_k must be an integer in [0, 2**31)"),
        ({"id": "a", "prompt": "x", "max_new_tokens": 2.0}, "max_new_tokens must be an integer in [1, 2**31), not 2.0"),
        ({"id": "a", "prompt": "x", "temperature": 10**400}, "temperature must be a number >= 0"),
        ({"id": "a", "prompt": "x", "seed": 2**32}, "seed must be an integer in [0, 2**32)"),
        ({"id": "a", "prompt": ""}, "prompt must be a non-empty string"),
        ({"id": "a", "prompt": "x", "reasoning_effort": "low"}, "reasoning_effort applies to messages only"),
        ({"id": "a", "prompt": "x", "tools": []}, "tools applies to messages only"),
        ({"id": "a", "prompt": "x", "logprobs": 1}, "logprobs must be true or false, not 1"),
        ({"id": "a", "prompt": "x", "logprobs": True, "top_logprobs": -1}, "top_logprobs must be an integer in [0, 20"),
        ({"id": "a", "prompt": "x", "top_logprobs": 3}, "top_logprobs needs logprobs: true"),
        (
            {"id": "a", "messages": [{"role": "user", "content": "x"}], "reasoning_effort": "max"},
            "reasoning_effort must be",
        ),
        ({"id": "a", "messages": []}, "messages must be a non-empty list"),
        ({"id": "a", "messages": [{"role": "user", "text": "x"}]}, "messages[0]: unknown field(s) text"),
        ({"id": "a", "messages": [{"role": "user", "content": 3}]}, "messages[0].content must be a string"),
        ({"id": "a", "prompt_tokens": [1, -2]}, "prompt_tokens must hold token ids (integers >= 0), not -2"),
        ({"id": "a", "prompt": "x", "stop": [""]}, "stop entries must be non-empty strings or token ids"),
        ({"id": "a", "prompt": "x", "stop": ["s"] * 17}, "stop must be a string or a list of at most 16"),
        ({"id": "a"}, "need exactly one of prompt, messages, prompt_tokens, got none"),
        ({"id": "a", "prompt": "x", "n": 65}, "n must be an integer in [1, 64], not 65"),
        ({"id": "a", "prompt": "x", "n": 2, "seed": 2**32 - 1}, "seed + n must be at most 2**32"),
    ],
)
def test_records_name_the_bad_field(record, message):
    defaults = records.Sampling(max_new_tokens=8, temperature=0.0, top_p=1.0, top_k=0, seed=0)
    with pytest.raises(records.RecordError) as caught:
        records.parse_record(7, json.dumps(record), defaults)
    assert message in caught.value.message and (caught.value.line, caught.value.id) == (7, "a")
    assert str(caught.value).startswith("line 7 (id 'a'): ")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"tools": [{"name": "f"}]}, 'tools[0] must be an object with "type": "function"'),
        ({"tools": [TOOL | {"name": "a b"}]}, "tools[0] needs a name of 1 to 64 letters, digits, _ and -, not"),
        ({"tools": [TOOL | {"strict": True}]}, "tools[0]: want name, description and parameters"),
        ({"tools": [TOOL | {"parameters": []}]}, "tool 'f': parameters must be a JSON Schema object"),
        ({"tools": [TOOL | {"description": 1}]}, "tool 'f': description must be a string"),
        (
            {"messages": [USER, {"role": "assistant", "tool_calls": [{"name": "f"}]}]},
            "messages[1].tool_calls[0] must be an object with name and arguments only",
        ),
        (
            {"messages": [USER, {"role": "assistant", "tool_calls": [{"name": "f", "arguments": {}}]}]},
            "messages[1].tool_calls[0].arguments must be a string",
        ),
        ({"messages": [USER, {"role": "assistant", "content": None}]}, "messages[1].content must be a string"),
        ({"messages": [{"role": "tool", "name": 3, "content": "x"}]}, "messages[0].name must be a string"),
    ],
)
def test_tool_fields_name_the_bad_part(fields, message):
    with pytest.raises(records.RecordError) as caught:
        records.parse_record(7, json.dumps({"id": "a", "messages": [USER]} | fields), DEFAULTS)
    assert message in caught.value.message


def tools_of(line: dict[str, Any]) -> tuple[Tool, ...]:
    return records.parse_record(1, json.dumps({"id": "a"} | line), DEFAULTS).tools


def test_tools_in_either_api_form_are_one_tool():
    call = {"role": "assistant", "content": None, "tool_calls": [{"name": "f", "arguments": "{}"}]}
    responses_form = tools_of({"messages": [USER, call], "tools": [TOOL]})
    chat_completions_form = tools_of({"messages": [USER], "tools": [{"type": "function", "function": TOOL_SPEC}]})
    assert responses_form == chat_completions_form == (Tool("f", "Does f.", TOOL_SPEC["parameters"]),)
    assert tools_of({"messages": [USER], "tools": [{"type": "function", "name": "g"}]}) == (Tool("g"),)


CALL_COMPLETION = (
    "<|channel|>analysis<|message|>Call f.<|end|>"
    "<|start|>assistant<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>{arguments}<|call|>"
)


@pytest.mark.parametrize(
    "name, arguments, error",
    [
        ("f", '{"x": [1, 2]}', None),
        ("f", '{"x": [1, 2', "arguments are not valid JSON"),
        ("g", "{}", "a call to 'g', which is not a declared tool"),
    ],
)
def test_a_completion_that_calls_a_tool_ends_with_its_call(tokenizer, name, arguments, error):
    record = records.parse_record(3, json.dumps({"id": "a", "messages": [USER], "tools": [TOOL]}), DEFAULTS)
    tokens = encode_with_control_tokens(tokenizer, CALL_COMPLETION.format(name=name, arguments=arguments))
    line = result_record(record, Result("a", tokens, "stop", 5), tokenizer)
    assert (line["finish_reason"], line["tool_calls"]) == ("tool_calls", [{"name": name, "arguments": arguments}])
    assert line["analysis"] == "Call f." and line["final"] is None
    if error is None:
        assert "tool_call_error" not in line
    else:
        assert error in line["tool_call_error"]
    cut = result_record(record, Result("a", tokens[:-1], "length", 5), tokenizer)
    assert cut["finish_reason"] == "length" and "tool_calls" not in cut


def test_a_call_token_that_closes_no_call_is_no_tool_call(tokenizer):
    record = records.parse_record(3, json.dumps({"id": "a", "messages": [USER], "tools": [TOOL]}), DEFAULTS)
    in_header = encode_with_control_tokens(tokenizer, "<|channel|>commentary<|call|>")
    assert result_record(record, Result("a", in_header, "stop", 5), tokenizer)["finish_reason"] == "stop"
    to_a_builtin = encode_with_control_tokens(tokenizer, "<|channel|>analysis to=python<|message|>1+1<|call|>")
    line = result_record(record, Result("a", to_a_builtin, "stop", 5), tokenizer)
    assert (line["finish_reason"], line["tool_calls"]) == ("tool_calls", [])
    assert line["tool_call_error"] == "a call to 'python', which is not a function tool"


def test_result_records_hold_the_scores_of_the_tokens_they_keep(tokenizer):
    record = records.parse_record(
        2, json.dumps({"id": "a", "prompt": "x", "stop": ["c"], "logprobs": True, "prompt_logprobs": True}), DEFAULTS
    )
    scores = [TokenLogprob(-0.5 * i, i + 1, [(97 + i, -0.1), (120, -0.2)]) for i in range(4)]
    result = Result("a", tokenizer.encode("abcd"), "length", 2, logprobs=scores, prompt_logprobs=[(98, -1.5)])
    line = result_record(record, result, tokenizer)
    assert (line["text"], line["tokens"], line["finish_reason"]) == ("ab", [97, 98, 99], "stop")  # "c" cut the rest
    x = {"token": 120, "text": "x", "logprob": -0.2}
    assert line["logprobs"] == [
        {"token": 97 + i, "text": "abc"[i], "logprob": -0.5 * i, "rank": i + 1,
         "top_logprobs": [{"token": 97 + i, "text": "abc"[i], "logprob": -0.1}, x]}
        for i in range(3)
    ]  # fmt: skip
    assert line["prompt_logprobs"] == [{"token": 98, "text": "b", "logprob": -1.5}]


def test_nan_and_bad_defaults_are_refused():
    defaults = records.Sampling(max_new_tokens=8, temperature=0.0, top_p=1.0, top_k=0, seed=0)
    with pytest.raises(records.RecordError, match="temperature must be a number >= 0, not NaN"):
        records.parse_record(1, '{"id": "a", "prompt": "x", "temperature": NaN}', defaults)
    with pytest.raises(ValueError, match=r"sampling.top_p must be a number in \(0, 1\], not 1.5"):
        records.sampling_defaults({"max_new_tokens": 8, "temperature": 0.0, "top_p": 1.5, "top_k": 0, "seed": 0})


@pytest.mark.parametrize(
    "pool, message",
    [({"page_size": 100}, "page_size=100 must divide max_len=384"),
     ({"page_size": 64, "kv_pages": 5}, "kv_pages=5 cannot hold one sequence of max_len=384, which takes 6 pages")],
)  # fmt: skip
def test_bad_page_settings_are_refused_before_the_checkpoint_is_read(tmp_path, pool, message):
    """The checkpoint does not exist: the job names the page setting first."""
    config = job_config(tmp_path / "no-checkpoint", write_jsonl(tmp_path / "in.jsonl", []), tmp_path / "out", **pool)
    with pytest.raises(StartError, match=message):
        run(config)
    assert not (tmp_path / "out").exists()


def test_unreadable_input_fails_at_start_and_writes_nothing(hf_checkpoint, tmp_path):
    process = run_cli(cli(hf_checkpoint, tmp_path / "missing.jsonl", tmp_path / "out"))
    assert process.returncode == 2, process.stderr
    assert f"gptoss-generate: error: cannot read the input {tmp_path / 'missing.jsonl'}" in process.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(job_files.InputError, match="cannot read the input"):
        run(job_config(hf_checkpoint, tmp_path, tmp_path / "out"))  # a directory
    assert not (tmp_path / "out").exists()


def test_unreadable_gcs_input_fails_at_start(hf_checkpoint, gcs_bucket):
    with pytest.raises(job_files.InputError, match=f"cannot read the input {gcs_bucket}/missing.jsonl"):
        run(job_config(hf_checkpoint, f"{gcs_bucket}/missing.jsonl", f"{gcs_bucket}/never"))
    assert not filesystem(gcs_bucket).glob(f"{gcs_bucket}/never/*")


# -------------------------------------------------------------------------------------------- exactly once


def test_parts_are_uploaded_whole_and_numbered_on(tmp_path):
    directory = f"memory://{tmp_path.name}/out"
    log = job_files.PartsLog(directory, "results", part_records=2, part_seconds=3600)
    log.start_writing()
    for i in range(5):
        log.append({"line": i + 1, "id": f"r{i}"})
    assert max(filesystem(directory).ls(directory, detail=False)).endswith("results-00001.jsonl")
    log.close()
    reopened = job_files.PartsLog(directory, "results", part_records=2, part_seconds=0)
    assert [record["id"] for _, record in reopened.entries()] == [f"r{i}" for i in range(5)]
    reopened.append({"line": 7, "id": "ignored"})  # a process that is not the writer writes nothing
    reopened.start_writing()
    reopened.append({"line": 6, "id": "r5"})  # part_seconds=0: uploaded at once
    assert [p.rsplit("/", 1)[1] for p in sorted(filesystem(directory).ls(directory, detail=False))] == [
        "results-00000.jsonl", "results-00001.jsonl", "results-00002.jsonl", "results-00003.jsonl"
    ]  # fmt: skip


# Every prompt starts with one system prefix (two pages of KILL_PAGE) and one of five group prefixes (a third
# page), so that with prefix caching the requests share full cached pages; every tenth asks for 3 samples,
# sampled: each (id, index) must end up written once, and equal to a run without caching.
KILL_PAGE = 16
KILL_PREFIXES = [[*range(10, 42), *range(100 + 16 * group, 116 + 16 * group)] for group in range(5)]
KILL_REQUESTS = [{"id": f"k{i:03d}", "prompt_tokens": [*KILL_PREFIXES[i % 5], 1 + i % 200, 2 + i % 50, 3]}
                 | ({"n": 3, "temperature": 1.0, "seed": i} if i % 10 == 3 else {}) for i in range(64)]  # fmt: skip
KILL_SAMPLES = sorted((r["id"], index) for r in KILL_REQUESTS for index in range(r.get("n", 1)))
KILL_LINES = [*KILL_REQUESTS[:10], {"id": "k005", "prompt": "duplicate"}, *KILL_REQUESTS[10:]]


def prefill_counts(summary: str) -> tuple[int, int]:
    """(tokens prefilled, prompt tokens) from a job's summary line."""
    prefilled, prompt = re.search(r"(\d+) tokens prefilled for (\d+) prompt tokens", summary).groups()
    return int(prefilled), int(prompt)


@pytest.fixture(scope="module")
def uninterrupted(hf_checkpoint, tmp_path_factory):
    """Results and errors of the kill test's input, from a job run through in one go, without prefix caching."""
    directory = tmp_path_factory.mktemp("uninterrupted")
    command = cli(hf_checkpoint, write_jsonl(directory / "in.jsonl", KILL_LINES), directory / "out")
    process = run_cli(command)
    assert process.returncode == 1, process.stderr  # the duplicate failed
    prefilled, prompt = prefill_counts(process.stdout)
    assert prefilled == prompt == sum(len(r["prompt_tokens"]) * r.get("n", 1) for r in KILL_REQUESTS)
    return by_sample(read_output(directory / "out", job_files.RESULTS)), read_output(directory / "out", job_files.ERRORS)


def wait_for_records(output: str, count: int, process: subprocess.Popen, timeout_s: float = 240.0) -> bool:
    """Waits until `output` holds `count` results (local) or parts of them (elsewhere); False if the job ended
    or the time ran out first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        if paths.is_local(output):
            path = Path(output) / "results.jsonl"
            done = path.read_bytes().count(b"\n") if path.exists() else 0
        else:
            filesystem(output).invalidate_cache()
            done = len(filesystem(output).glob(f"{output}/results-*.jsonl"))
        if done >= count:
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_killed_job_started_again_writes_every_record_exactly_once(
    request, where, hf_checkpoint, uninterrupted, tmp_path
):
    base = str(tmp_path) if where == "local" else f"{request.getfixturevalue('gcs_bucket')}/kill-test"
    input_path, output = write_jsonl(f"{base}/in.jsonl", KILL_LINES), f"{base}/out"
    # the killed job's lock is never released: the rerun takes it over once lock_timeout_s has passed
    command = cli(hf_checkpoint, input_path, output, part_records=2, lock_timeout_s=1, page_size=KILL_PAGE,
                  prefix_caching=True)  # fmt: skip
    log_path = tmp_path / "killed.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        reached = wait_for_records(output, 3, process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert reached and process.returncode == -signal.SIGKILL, log_path.read_text()[-3000:]
    survived = by_sample(read_output(output, job_files.RESULTS))
    assert 0 < len(survived) < len(KILL_SAMPLES)
    whole = [r for r in KILL_REQUESTS if all((r["id"], i) in survived for i in range(r.get("n", 1)))]
    done = len(whole) + len(read_output(output, job_files.ERRORS))  # the error waits in memory on gs://
    if where == "local":  # a line cut off by the kill, as a write interrupted midway leaves it
        with open(Path(output) / "results.jsonl", "ab") as results:
            results.write(f'{{"line": {len(KILL_LINES)}, "id": "{KILL_REQUESTS[-1]["id"]}", "text": "cut o'.encode())
    time.sleep(1)
    again = run_cli(command)
    assert again.returncode == 1, again.stderr
    assert f"({done} done by an earlier run" in again.stdout
    prefilled, prompt = prefill_counts(again.stdout)  # the rerun ran the lines not done, from cached prefixes
    assert 0 < 4 * prefilled < prompt, again.stdout
    results, errors = by_sample(read_output(output, job_files.RESULTS)), read_output(output, job_files.ERRORS)
    expected_results, expected_errors = uninterrupted
    assert sorted(results) == KILL_SAMPLES
    assert results == expected_results
    assert errors == expected_errors == [{"line": 11, "id": "k005", "error": "duplicate id 'k005', first on line 6"}]


def test_a_line_of_n_samples_resumes_only_its_missing_samples(hf_checkpoint, tmp_path):
    """A job of a line with n=3 whose second sample was lost (as a kill between two writes leaves it): the rerun
    writes that sample alone, as it was; the samples differ and sample 0 is the line's n=1 completion."""
    line = {"prompt_tokens": [5, 6, 7], "temperature": 1.0, "seed": 11}
    lines = [line | {"id": "many", "n": 3}, line | {"id": "one"}]
    config = job_config(hf_checkpoint, write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out")
    run(config)
    first = by_sample(read_output(tmp_path / "out", job_files.RESULTS))
    assert sorted(first) == [("many", 0), ("many", 1), ("many", 2), ("one", 0)]
    assert len({tuple(first["many", index]["tokens"]) for index in range(3)}) == 3
    assert first["many", 0]["tokens"] == first["one", 0]["tokens"]
    kept = [record for record in first.values() if (record["id"], record["index"]) != ("many", 1)]
    write_jsonl(tmp_path / "out" / "results.jsonl", kept)
    summary = run(config)
    assert summary.ok == 1 and summary.done_before == 1
    again = read_output(tmp_path / "out", job_files.RESULTS)
    assert again[:-1] == kept and by_sample(again) == first


# ------------------------------------------------------------------------------------------------ streaming


def results_on_disk(output: Path) -> int:
    path = output / "results.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_results_reach_the_disk_while_the_job_runs(hf_checkpoint, tmp_path):
    """Each result is written as its request finishes. Requests are read as slots free up, so with 4 slots the
    40th starts only once 36 have finished: 1 to 35 results on disk while the job runs were written before the
    last requests started."""
    rng = np.random.default_rng(2)
    lines = [{"id": f"s{i:02d}", "prompt_tokens": rng.integers(0, 256, rng.integers(1, 300)).tolist(),
              "max_new_tokens": 1 + i % 3 if i < 4 else int(rng.integers(20, 120))} for i in range(40)]  # fmt: skip
    output = tmp_path / "out"
    command = cli(hf_checkpoint, write_jsonl(tmp_path / "in.jsonl", lines), output)
    log_path = tmp_path / "job.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=log)
    seen = []  # results on disk, each counted while the job still ran
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            count = results_on_disk(output)
            if process.poll() is not None:
                break
            seen.append(count)
            time.sleep(0.01)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0, log_path.read_text()[-3000:]
    assert sorted(by_id(read_output(output, job_files.RESULTS))) == [line["id"] for line in lines]
    before_the_last = sorted({count for count in seen if 0 < count < 36})
    assert len(before_the_last) >= 3, f"results on disk while the job ran: {sorted(set(seen))}"
