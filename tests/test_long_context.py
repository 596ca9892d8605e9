"""Long prompts: prefilled in pieces that attend to the cache, with the logits of one call and of transformers,
and memory that stays bounded for a 16,384-token prompt."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import small_config
from gptoss_dist import from_pretrained, settings
from gptoss_dist.engine import Engine, Request
from gptoss_dist.model import GptOss, Span, forward
from gptoss_dist.random_checkpoint import write_random_checkpoint
from gptoss_dist.sharding import MESH_AXES, make_mesh
from reference import load_reference, reference_logits

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.py"


@nnx.jit(static_argnames=("block",))
def _piece_logits(model: GptOss, tokens, first, count, slot, caches, block):
    span = Span(first=first, start=jnp.zeros_like(first), end=count, slot=slot)
    hidden, caches = model.hidden_states(tokens, span, caches, attention_block=block)
    return model.logits(hidden), caches


def logits_in_pieces(model, mesh, prompts: list[np.ndarray], piece: int, block: int) -> list[np.ndarray]:
    """Each prompt's logits [T, V], prefilled together in pieces of `piece` tokens; prompt r in slot r."""
    engine = Engine(model, mesh, max_slots=len(prompts), max_len=64)
    caches = engine.empty_slots().cache
    longest = max(map(len, prompts))
    pieces = [[] for _ in prompts]
    for first in range(0, longest, piece):
        tokens = np.zeros((len(prompts), piece), np.int32)
        count = np.zeros(len(prompts), np.int32)
        for row, prompt in enumerate(prompts):
            part = prompt[first : first + piece]
            tokens[row, : len(part)], count[row] = part, len(part)
        with jax.set_mesh(mesh):
            logits, caches = _piece_logits(model, tokens, np.full(len(prompts), first, np.int32), count,
                                           np.arange(len(prompts), dtype=np.int32), caches, block)  # fmt: skip
        for row in range(len(prompts)):
            pieces[row].append(np.asarray(logits)[row, : count[row]])
    return [np.concatenate(rows) for rows in pieces]


@pytest.fixture(scope="module")
def prompts_and_expected(small_checkpoint):
    """Prompts of 29 and 17 tokens, with transformers' logits, checked against ours in one call."""
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 128, n).astype(np.int32) for n in (29, 17)]
    reference = load_reference(small_checkpoint)
    model = from_pretrained(small_checkpoint, dtype=jnp.float32)
    expected = []
    for prompt in prompts:
        logits = reference_logits(reference, prompt)
        whole = np.asarray(forward(model, jnp.asarray(prompt[None])))[0]
        assert np.abs(whole - logits).max() <= 1e-5 * np.abs(logits).max()
        expected.append(logits)
    return prompts, expected


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (2, 2, 2)])
def test_logits_of_prompts_in_pieces_equal_transformers(small_checkpoint, prompts_and_expected, mesh_shape):
    """The two prompts together, in pieces of 8 (edges on the 8-key windows' edges), 5 and 3 (windows
    straddling the pieces), with attention blocks of 4: 3 to 10 pieces each."""
    mesh = make_mesh(dict(zip(MESH_AXES, mesh_shape)), small_config(), jax.devices()[: int(np.prod(mesh_shape))])
    model = from_pretrained(small_checkpoint, dtype=jnp.float32, mesh=mesh)
    prompts, expected = prompts_and_expected
    for piece in (8, 5, 3):
        for got, logits in zip(logits_in_pieces(model, mesh, prompts, piece, block=4), expected, strict=True):
            assert np.abs(got - logits).max() <= 1e-5 * np.abs(logits).max(), f"pieces of {piece}"


@pytest.fixture(scope="module")
def long_context_checkpoint(tmp_path_factory) -> Path:
    """The tiny model, which has GPT-OSS's 131,072 positions."""
    cfg = settings.model_config(runpy.run_path(str(TINY))["get_config"]())
    assert cfg.max_position_embeddings == 131072
    return write_random_checkpoint(tmp_path_factory.mktemp("long-hf"), cfg, seed=6)


# Runs argv[2:] and writes its peak RSS (KiB) to argv[1]; exits with its exit code. A small process between the
# test and the job: a child's peak RSS counts the memory of the process it was forked from until it execs, and
# a pytest worker's is gigabytes.
MEASURE_PEAK_RSS = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measuring_peak_rss(
    command: list[str], directory: Path, timeout_s: float
) -> tuple[subprocess.CompletedProcess, int]:
    """Runs `command`; gives its outcome and its own peak RSS in bytes (0 if it did not start)."""
    peak = directory / "peak_rss_kib"
    done = subprocess.run([sys.executable, "-c", MEASURE_PEAK_RSS, str(peak), *command], capture_output=True,
                          text=True, timeout=timeout_s)  # fmt: skip
    return done, int(peak.read_text()) * 1024 if peak.exists() else 0


def test_a_16k_token_prompt_runs_in_bounded_memory_and_pieces_do_not_change_tokens(long_context_checkpoint, tmp_path):
    """One 16,384-token prompt through the job, in pieces of 512: peak memory stays under 3 GB (the whole
    [heads, T, T] float32 score matrix alone would be 8 GiB), and pieces of 2,048 give the same tokens."""
    prompt = np.random.default_rng(7).integers(0, 512, 16384).tolist()
    source = tmp_path / "long.jsonl"
    source.write_text(json.dumps({"id": "long", "prompt_tokens": prompt, "max_new_tokens": 8}) + "\n")
    output = tmp_path / "out"
    command = [
        sys.executable, "-m", "gptoss_dist.generate", f"--config={TINY}",
        f"--config.checkpoint={long_context_checkpoint}", f"--config.input={source}", f"--config.output={output}",
        "--config.max_slots=1", "--config.max_len=16640", "--config.prefill_tokens=512",
    ]  # fmt: skip
    done, peak_bytes = run_measuring_peak_rss(command, tmp_path, timeout_s=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert peak_bytes < 3e9, f"peak RSS {peak_bytes / 1e9:.2f} GB"
    result = json.loads((output / "results.jsonl").read_text())
    assert result["usage"]["prompt_tokens"] == 16384 and result["tokens"]

    model = from_pretrained(long_context_checkpoint, dtype=jnp.float32)
    engine = Engine(model, max_slots=1, max_len=16640, prefill_tokens=2048)  # without the tokenizer's stop tokens
    tokens = engine.generate([Request(prompt, max_new_tokens=8)])[0].tokens
    assert tokens[: len(result["tokens"])] == result["tokens"]
    assert sum(engine.prefill_shapes.values()) == 8


def test_max_len_beyond_the_models_positions_is_refused_naming_both(long_context_checkpoint):
    with pytest.raises(ValueError, match="max_len 131073 exceeds the model's 131072 positions"):
        Engine(from_pretrained(long_context_checkpoint, dtype=jnp.float32), max_slots=1, max_len=131073)
    done = subprocess.run([sys.executable, "-m", "gptoss_dist.plan", f"--config={ROOT / 'configs' / 'gpt_oss_20b.py'}",
                           "--config.max_len=200000"], capture_output=True, text=True)  # fmt: skip
    assert done.returncode != 0
    assert "error: max_len 200000 exceeds the model's 131072 positions" in done.stderr
