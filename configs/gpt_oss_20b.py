"""openai/gpt-oss-20b: 24 layers, 32 experts."""

from gptoss_dist.settings import run_settings


def get_config():
    return run_settings(model=dict(num_layers=24, num_experts=32))
