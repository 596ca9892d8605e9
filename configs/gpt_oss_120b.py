"""openai/gpt-oss-120b: 36 layers, 128 experts."""

from gptoss_dist.settings import run_settings


def get_config():
    return run_settings(model=dict(num_layers=36, num_experts=128))
