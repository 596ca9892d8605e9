"""Batch inference for OpenAI's GPT-OSS models in JAX/Flax, sharded over a TPU pod or a GPU."""

from gptoss_dist.checkpoint import CheckpointError, from_pretrained
from gptoss_dist.config import ConfigError, ModelConfig
from gptoss_dist.model import GptOss

__all__ = ["CheckpointError", "ConfigError", "GptOss", "ModelConfig", "from_pretrained"]
