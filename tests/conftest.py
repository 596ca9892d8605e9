"""Shared fixtures. JAX sees 8 CPU devices so that sharded tests can build meshes.

One persistent compilation cache serves the whole run: the first process to compile a program (an xdist
worker, or a job a test starts) writes it, and every later engine or job of the same shapes loads it instead
of compiling again. The process that starts the run makes it; xdist's workers and the jobs they start inherit
it through the environment, and it is removed when that process ends.
"""

import os
import shutil
import tempfile

import jax

CACHE_VARIABLE = "JAX_COMPILATION_CACHE_DIR"
made_cache = CACHE_VARIABLE not in os.environ
if made_cache:
    os.environ[CACHE_VARIABLE] = tempfile.mkdtemp(prefix="gptoss-dist-tests-jax-cache-")

jax.config.update("jax_num_cpu_devices", 8)
# set here too: jax read the environment when it was imported, before a run's first process made the cache
jax.config.update("jax_compilation_cache_dir", os.environ[CACHE_VARIABLE])

import pytest  # noqa: E402

# imported by test modules before pytest loads them
pytest.register_assert_rewrite("job_fixtures", "tokenizer_fixtures")

from gptoss_dist.config import FULL, SLIDING, ModelConfig  # noqa: E402


def small_config(**overrides) -> ModelConfig:
    """A small GPT-OSS: 3 layers (odd), 2 query heads per KV head, 3 of 6 experts, window 8."""
    fields = dict(
        vocab_size=128, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
        intermediate_size=64, num_experts=6, experts_per_token=3, sliding_window=8,
        layer_types=(SLIDING, FULL, SLIDING), max_position_embeddings=4096,
    )  # fmt: skip
    return ModelConfig(**(fields | overrides))


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory):
    from gptoss_dist.random_checkpoint import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("small-hf"), small_config(), seed=1)


def pytest_unconfigure(config):
    if made_cache:
        shutil.rmtree(os.environ.pop(CACHE_VARIABLE), ignore_errors=True)
