"""A mid-size GPT-OSS (random weights) for CPU benchmarks: the real architecture at about 1/6 the width."""

from gptoss_dist.settings import run_settings


def get_config():
    return run_settings(
        model=dict(
            vocab_size=32768,
            hidden_size=512,
            num_layers=8,
            num_heads=16,
            num_kv_heads=4,
            head_dim=32,
            intermediate_size=512,
            num_experts=16,
            experts_per_token=4,
        ),
        dtype="float32",
    )
