"""Fixtures of the engine's tests (`test_engine.py`, `test_paged.py`; a test module loads them with
`pytest_plugins = ["engine_fixtures"]`): a small random checkpoint and its model, prompts of several lengths,
and a mixed batch of greedy and seeded requests with their results from four slots."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_config

from gptoss_dist import from_pretrained
from gptoss_dist.engine import Engine, Request
from gptoss_dist.random_checkpoint import write_random_checkpoint
from gptoss_dist.sharding import MESH_AXES, make_mesh

CONFIG = small_config(num_heads=8, num_kv_heads=2, num_experts=8, experts_per_token=3, intermediate_size=96)
PROMPT_LENGTHS = (3, 20, 9, 40, 1, 13)  # several longer than the window of 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("engine-hf"), CONFIG, seed=4)


@pytest.fixture(scope="module")
def model(checkpoint):
    return from_pretrained(checkpoint, dtype=jnp.float32)


def prompts(lengths=PROMPT_LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in lengths]


def mesh_of(shape):
    return make_mesh(dict(zip(MESH_AXES, shape)), CONFIG, jax.devices()[: math.prod(shape)])


@pytest.fixture(scope="module")
def mixed(model):
    """Greedy and seeded requests of several lengths, more than four slots hold, and their results from an
    engine with four slots and a page of max_len per slot."""
    budgets = (30, 3, 17, 1, 25, 9)
    requests = [Request(p, max_new_tokens=n, temperature=0.8 * (i % 2), top_k=20 * (i % 3), seed=i, id=i)
                for i, (p, n) in enumerate(zip(prompts(), budgets))]  # fmt: skip
    return requests, {result.id: result for result in mixed_engine(model).generate(requests)}


def mixed_engine(model, **pool):
    return Engine(model, max_slots=4, max_len=96, steps_per_call=4, min_prefill_len=64, **pool)  # few shapes


def streamed(engine, requests):
    """Each request's result and the tokens of its updates, checking that no update follows a result."""
    pieces = {request.id: [] for request in requests}
    results = {}
    for update in engine.stream(requests):
        assert update.request.id not in results, "an update after the request's result"
        pieces[update.request.id].append(update.tokens)
        if update.result is not None:
            results[update.request.id] = update.result
    return results, pieces
