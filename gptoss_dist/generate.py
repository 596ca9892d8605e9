"""`gptoss-generate`: a batch generation job, JSONL requests in, JSONL results out, local or on `gs://`.

    python -m gptoss_dist.generate --config=configs/gpt_oss_20b.py --config.checkpoint=gs://bucket/gpt-oss-20b \\
        --config.input=gs://bucket/requests.jsonl --config.output=gs://bucket/run-1

The checkpoint (the Hugging Face layout or a converted one, local or `gs://`) defines the model and holds its
`tokenizer.json`; the config file holds the run's settings (`gptoss_dist.settings`: mesh, slots, lengths,
sampling defaults, paths), each of which can be overridden as `--config.x=y`. `gptoss_dist.records` describes
the records, `gptoss_dist.job_files` how the output is written exactly once: a job that is killed and started
again with the same settings and input continues where it stopped. The output records what made it; a run
whose input or settings differ is refused, except that `retry_errors` runs the lines that ended in errors
again, edited or not. One job at a time writes an output: it takes the output's lock before any weight is
read, which also checks that the output can be written.

Every request is checked before it reaches the engine. One that cannot run goes to the errors with its line
number and id, and the job goes on with the others. Each result is written as its request finishes. The job
exits 1 if any request failed (in this run or an earlier run of it into the same output), 2 if it cannot
start (a bad setting, an unreadable input or checkpoint, an output it cannot write or that another job
holds, an input or settings that differ from those that made the output; no record is written then)
or loses its output's lock to another job, 3 if a process of a multi-process job stops because another
process is lost (`distributed.PeerWatch`: it died or hangs).

Stop strings end a completion where one first appears in its text (where control tokens appear by name):
`text` ends before it, `tokens` with the token that completes it, and finish_reason is "stop". The engine stops
on token ids only: a stop string that is one token is handed to it as a stop id too, so the request ends there;
any other stop string is found on the host once the request has ended on a stop token or its token limit,
which costs the tokens generated past it, not correctness.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from gptoss_dist import distributed, job_files, records, settings
from gptoss_dist.checkpoint import CheckpointError
from gptoss_dist.config import ConfigError
from gptoss_dist.engine import Engine, Request, Result, TokenLogprob
from gptoss_dist.exit_codes import EXIT_CANNOT_START, EXIT_FAILED_REQUESTS, EXIT_PEER_LOST
from gptoss_dist.harmony import Message, channel_texts, parse_reply, render_for_completion, tool_calls
from gptoss_dist.records import InputRecord, RecordError
from gptoss_dist.sharding import MeshError
from gptoss_dist.startup import (
    StartError,
    check_engine_settings,
    check_given,
    make_engine,
    planned_mesh,
)
from gptoss_dist.tokenizer import Tokenizer, load_tokenizer


@dataclasses.dataclass
class Summary:
    """What a run did: requests that succeeded and failed, those an earlier run had done, tokens generated, and
    the prompt tokens of the samples run beside the context tokens that prefill calls ran for them (fewer where
    prefixes came from cached pages; more where preempted sequences ran again)."""

    output: str
    ok: int = 0
    failed: int = 0
    done_before: int = 0
    failed_before: int = 0
    tokens: int = 0
    seconds: float = 0.0
    prompt_tokens: int = 0
    prefilled: int = 0

    @property
    def exit_code(self) -> int:
        return EXIT_FAILED_REQUESTS if self.failed or self.failed_before else 0

    def line(self) -> str:
        rate = self.tokens / self.seconds if self.seconds else 0.0
        before = f" ({self.done_before} done by an earlier run, {self.failed_before} of them failed)"
        return (
            f"{self.ok} requests ok, {self.failed} failed{before if self.done_before else ''}; "
            f"{self.tokens} tokens in {self.seconds:.1f} s ({rate:.1f} tokens/s), "
            f"{self.prefilled} tokens prefilled for {self.prompt_tokens} prompt tokens; {self.output}"
        )


# ------------------------------------------------------------------------------------- requests and results


def prompt_tokens(record: InputRecord, tokenizer: Tokenizer, harmony: ml_collections.ConfigDict) -> list[int]:
    """The prompt's token ids: plain text as data, a conversation rendered in harmony, or the ids given."""
    if record.prompt is not None:
        return tokenizer.encode(record.prompt)
    if record.messages is not None:
        effort = record.reasoning_effort or harmony.reasoning_effort
        return render_for_completion(record.messages, tokenizer, tools=record.tools, reasoning_effort=effort,
                                     current_date=harmony.current_date or None)  # fmt: skip
    return list(record.prompt_tokens)


def stop_ids(record: InputRecord, tokenizer: Tokenizer, vocab_size: int) -> list[int]:
    """The request's stop token ids: those given, and the stop strings that are one token."""
    ids = [entry for entry in record.stop if isinstance(entry, int)]
    if bad := [i for i in ids if i >= vocab_size]:
        raise ValueError(f"stop token id {bad[0]} is not in the vocabulary [0, {vocab_size})")
    encoded = (tokenizer.encode(entry) for entry in record.stop if isinstance(entry, str))
    return ids + [tokens[0] for tokens in encoded if len(tokens) == 1]


def make_request(
    record: InputRecord, tokenizer: Tokenizer, engine: Engine, harmony: ml_collections.ConfigDict
) -> Request:
    """The engine's request for `record`; ValueError if it cannot run (say its prompt fills the context)."""
    sampling = record.sampling
    request = Request(
        prompt_tokens(record, tokenizer, harmony), max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p, seed=sampling.seed,
        stop=stop_ids(record, tokenizer, engine.config.vocab_size), id=record.id, n=record.n,
        logprobs=record.logprobs, top_logprobs=record.top_logprobs, prompt_logprobs=record.prompt_logprobs,
    )  # fmt: skip
    engine.validate(request)
    return request


def _first_stop(text: str, stop_strings: Sequence[str]) -> int | None:
    return min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=None)


def cut_at_stop_strings(
    tokens: list[int], finish_reason: str, stop_strings: Sequence[str], tokenizer: Tokenizer
) -> tuple[list[int], str, str]:
    """(tokens, text, finish_reason) of a completion ended where a stop string first appears in its text. A
    final stop token is not part of the text."""
    shown = tokens[:-1] if finish_reason == "stop" else tokens
    text = tokenizer.decode(shown)
    cut = _first_stop(text, stop_strings)
    if cut is None:
        return tokens, text, finish_reason

    def holds_stop(n: int) -> bool:
        return _first_stop(tokenizer.decode(shown[:n]), stop_strings) is not None

    kept = bisect.bisect_left(range(len(shown) + 1), True, key=holds_stop)  # the fewest tokens that hold one
    return tokens[:kept], text[:cut], "stop"


def harmony_fields(tokens: list[int], tool_names: Sequence[str], tokenizer: Tokenizer) -> dict[str, Any]:
    """The analysis and final channels of a harmony completion and, if it ends in a call, the call; or why it
    does not parse."""
    try:
        messages, call = parse_reply(tokens, tokenizer)
    except ValueError as err:
        return {"analysis": None, "final": None, "parse_error": str(err)}
    channels = channel_texts(messages)
    fields = {"analysis": channels.get("analysis"), "final": channels.get("final")}
    return fields | (tool_call_fields(call, tool_names) if call is not None else {})


def tool_call_fields(message: Message, tool_names: Sequence[str]) -> dict[str, Any]:
    """The fields of a completion that ends in the call `message`: finish_reason, the function call and what
    is wrong with it, if anything."""
    calls = tool_calls([message])
    fields = {"finish_reason": "tool_calls", "tool_calls": [dataclasses.asdict(call) for call in calls]}
    if not calls:
        return fields | {"tool_call_error": f"a call to {message.recipient!r}, which is not a function tool"}
    if calls[0].name not in tool_names:
        return fields | {"tool_call_error": f"a call to {calls[0].name!r}, which is not a declared tool"}
    try:
        json.loads(calls[0].arguments)
    except ValueError as err:
        return fields | {"tool_call_error": f"arguments are not valid JSON: {err}"}
    return fields


def logprob_fields(result: Result, kept: int, tokenizer: Tokenizer) -> dict[str, Any]:
    """The scores that the request asked for, of its first `kept` tokens and of its prompt."""

    def scored(token: int, logprob: float) -> dict[str, Any]:
        return {"token": token, "text": tokenizer.decode([token]), "logprob": logprob}

    def ranked(token: int, scores: TokenLogprob) -> dict[str, Any]:
        return scored(token, scores.logprob) | {"rank": scores.rank, "top_logprobs": [scored(*t) for t in scores.top]}

    fields = {}
    if result.logprobs is not None:
        fields["logprobs"] = [ranked(*entry) for entry in zip(result.tokens[:kept], result.logprobs, strict=False)]
    if result.prompt_logprobs is not None:
        fields["prompt_logprobs"] = [scored(*entry) for entry in result.prompt_logprobs]
    return fields


def result_record(record: InputRecord, result: Result, tokenizer: Tokenizer) -> dict[str, Any]:
    """The output line of a finished request (see gptoss_dist.records)."""
    stop_strings = [entry for entry in record.stop if isinstance(entry, str)]
    tokens, text, finish_reason = cut_at_stop_strings(result.tokens, result.finish_reason, stop_strings, tokenizer)
    line = {
        "line": record.line, "id": record.id, "index": result.index, "text": text, "tokens": tokens,
        "finish_reason": finish_reason,
        "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": len(tokens)},
    }  # fmt: skip
    line |= logprob_fields(result, len(tokens), tokenizer)
    if record.messages is None:
        return line
    return line | harmony_fields(tokens, [tool.name for tool in record.tools], tokenizer)


# ---------------------------------------------------------------------------------------------------- job


def check_settings(config: ml_collections.ConfigDict) -> records.Sampling:
    """The sampling defaults, once every setting the job reads is checked; StartError or SettingsError naming the
    one that is not."""
    for name in ("input", "output"):
        check_given(config, name)
    settings.check_positive(config, "max_slots", "part_records")
    if config.part_seconds < 0:
        raise StartError(f"part_seconds must be >= 0, not {config.part_seconds}")
    if not config.lock_timeout_s > 0:
        raise StartError(f"lock_timeout_s must be > 0, not {config.lock_timeout_s}")
    return check_engine_settings(config)


def result_settings(config: ml_collections.ConfigDict, defaults: records.Sampling) -> dict[str, Any]:
    """The settings that change what a request yields, by dotted name: one output holds the results of one
    set of them."""
    sampling = {f"sampling.{name}": value for name, value in dataclasses.asdict(defaults).items()}
    harmony = {f"harmony.{name}": value for name, value in config.harmony.items()}
    return {"checkpoint": config.checkpoint, "dtype": config.dtype, "max_len": config.max_len} | sampling | harmony


class Job:
    """Feeds records to the engine as it takes them and writes each outcome as it comes, counting them."""

    def __init__(self, config: ml_collections.ConfigDict, engine: Engine, tokenizer: Tokenizer,
                 output: job_files.JobOutput, bar: tqdm, summary: Summary):  # fmt: skip
        self.config, self.engine, self.tokenizer, self.output = config, engine, tokenizer, output
        self.bar, self.summary = bar, summary
        self.in_flight: dict[str, InputRecord] = {}
        self.samples_left: dict[str, int] = {}  # of each record in flight, the samples not finished yet
        self.start = time.monotonic()

    def run(self, items: Iterable[InputRecord | RecordError]) -> None:
        for request, result in self.engine.run(self.requests(items)):
            record = self.in_flight[request.id]
            if result.index not in self.output.result_samples.get(record.line, {}):  # else an earlier run wrote it
                self.output.write_result(result_record(record, result, self.tokenizer))
                self.summary.tokens += result.completion_tokens
            self.summary.prompt_tokens += result.prompt_tokens  # of every sample run, written before or not
            self.summary.prefilled = self.engine.prefilled_tokens
            self.samples_left[request.id] -= 1
            if not self.samples_left[request.id]:
                del self.in_flight[request.id], self.samples_left[request.id]
                self.summary.ok += 1
                self.advance()

    def requests(self, items: Iterable[InputRecord | RecordError]) -> Iterator[Request]:
        """The engine's requests for the items not done yet; the errors are written as they come."""
        for item in self.pending(items):
            prepared = self.prepare(item) if isinstance(item, InputRecord) else item
            if isinstance(prepared, RecordError):
                self.fail(prepared)
            else:
                self.in_flight[item.id], self.samples_left[item.id] = item, item.n
                yield prepared

    def pending(self, items: Iterable[InputRecord | RecordError]) -> Iterator[InputRecord | RecordError]:
        """`items` less those of lines an earlier run already wrote (a line of n samples: all of them)."""
        for item in items:
            if self.output.is_done(item.line, item.n if isinstance(item, InputRecord) else 1):
                self.summary.done_before += 1
            else:
                yield item

    def prepare(self, record: InputRecord) -> Request | RecordError:
        try:
            return make_request(record, self.tokenizer, self.engine, self.config.harmony)
        except Exception as err:  # noqa: BLE001  whatever tokenizing or rendering a record raises is its error
            return RecordError(record.line, record.id, records.error_message(err))

    def fail(self, error: RecordError) -> None:
        self.output.write_error(error.to_json())
        self.summary.failed += 1
        self.advance()

    def advance(self) -> None:
        self.summary.seconds = time.monotonic() - self.start
        self.bar.set_postfix_str(f"{self.summary.tokens / max(self.summary.seconds, 1e-9):.1f} tokens/s", refresh=False)
        self.bar.update()


def _writer_succeeded(succeeded: bool) -> bool:
    """Whether the writing process succeeded, as it says (every process calls this)."""
    if jax.process_count() == 1:
        return succeeded
    return bool(multihost_utils.broadcast_one_to_all(np.int32(succeeded)))


def lock_output(config: ml_collections.ConfigDict) -> job_files.OutputLock | contextlib.nullcontext:
    """The writing process's lock on the output (a context that releases it), which checks that the output
    can be written; a null context in the other processes, which raise too if the writer cannot take it."""
    if not distributed.is_writer():
        if not _writer_succeeded(True):
            raise StartError("process 0 cannot take the output (its error says why)")
        return contextlib.nullcontext()
    lock, taken = job_files.OutputLock(config.output, config.lock_timeout_s), False
    try:
        lock.acquire()
        taken = True
    finally:
        _writer_succeeded(taken)
    return lock


def open_output(
    config: ml_collections.ConfigDict, made_by: job_files.Manifest, lock: job_files.OutputLock | None
) -> job_files.JobOutput:
    """The job's output, checked against what makes this run (`made_by`), and opened for writing in the writer."""
    output = job_files.JobOutput(config.output, part_records=config.part_records, part_seconds=config.part_seconds,
                               lock=lock)  # fmt: skip
    output.resume(made_by, config.input, retry_errors=config.retry_errors)
    # Every process runs the same requests (each holds its data shard's slots); all must have read what an
    # earlier run did before the one writer changes it.
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("gptoss-generate: output read")
    if distributed.is_writer():
        output.start_writing()
    return output


def run_job(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Summary:
    """Runs the batch job that `config` describes (on `devices`, default all) and says what it did.

    Raises StartError (or the checkpoint's, the mesh's, the input's or the output's error) if it cannot start."""
    defaults = check_settings(config)
    mesh = planned_mesh(config, devices)
    made_by = job_files.Manifest(result_settings(config, defaults), job_files.read_fingerprints(config.input))
    with lock_output(config) as lock:
        output = open_output(config, made_by, lock)
        tokenizer = load_tokenizer(config.checkpoint)
        engine = make_engine(config, tokenizer, mesh)
        summary = Summary(output.describe(), failed_before=output.failed_before)
        bar = tqdm(total=len(made_by.lines), initial=len(output.done_lines), unit="request", desc="generating",
                   dynamic_ncols=True, disable=not distributed.is_writer())  # fmt: skip
        items = records.read_records(job_files.read_lines(config.input), defaults, output.result_lines)
        try:
            Job(config, engine, tokenizer, output, bar, summary).run(items)
        finally:
            bar.close()
            output.close()
    return summary


def stop_for_lost_peer(why: str) -> None:
    """Ends this process of a multi-process job because another is lost (`why`), with one line, skipping JAX's
    shutdown, whose barrier waits for the lost process."""
    print(f"gptoss-generate: error: process {jax.process_index()} of {jax.process_count()} stopped: {why}",
          file=sys.stderr)  # fmt: skip
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_PEER_LOST)


def stop_after_failed_step(err: jax.errors.JaxRuntimeError, watch: distributed.PeerWatch) -> None:
    """Ends this process after a step across the processes failed, as when another process died: once the
    watch has named the lost process (it ends the process then), or after its timeout without it."""
    time.sleep(watch.timeout_s + 2 * watch.interval_s)
    first_line = str(err).strip().splitlines()[0]
    stop_for_lost_peer(f"a step across the processes failed ({first_line}), and no process was found lost")


def main(argv: Sequence[str] | None = None) -> None:
    from absl import app
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, "A run config (configs/*.py).", lock_config=True)

    def run(_):
        distributed.initialize(config.value.distributed)
        watch = None
        try:
            watch = distributed.watch_peers(config.value.distributed.peer_timeout_s, stop_for_lost_peer)
            summary = run_job(config.value)
        except (StartError, settings.SettingsError, job_files.InputError, job_files.OutputError, CheckpointError,
                ConfigError, MeshError) as err:
            print(f"gptoss-generate: error: {err}", file=sys.stderr)
            sys.exit(EXIT_CANNOT_START)
        except jax.errors.JaxRuntimeError as err:
            if watch is None:
                raise
            stop_after_failed_step(err, watch)
        if distributed.is_writer():
            print(f"gptoss-generate: {summary.line()}")
        sys.exit(summary.exit_code)

    app.run(run, argv=list(argv) if argv is not None else None)


if __name__ == "__main__":
    main()
