"""Shared fixtures. JAX sees 8 CPU devices so that sharded tests can build meshes."""

import jax

jax.config.update("jax_num_cpu_devices", 8)

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
