"""A tiny GPT-OSS (random weights) for tests and the demo: same architecture, small numbers."""

from gptoss_dist.settings import run_settings


def get_config():
    return run_settings(
        model=dict(
            vocab_size=512,
            hidden_size=64,
            num_layers=4,
            num_heads=8,
            num_kv_heads=2,
            head_dim=16,
            intermediate_size=64,
            num_experts=8,
            experts_per_token=4,
            sliding_window=8,
            layer_types=("sliding_attention", "full_attention") * 2,
            max_position_embeddings=131072,
        ),
        dtype="float32",
        max_slots=8,
        max_len=512,
    )
