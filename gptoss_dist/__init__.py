"""Batch inference for OpenAI's GPT-OSS models in JAX/Flax, sharded over a TPU pod or a GPU."""

import importlib

_EXPORTS = {
    "CheckpointError": "gptoss_dist.checkpoint",
    "from_pretrained": "gptoss_dist.loading",
    "ConfigError": "gptoss_dist.config",
    "ModelConfig": "gptoss_dist.config",
    "GptOss": "gptoss_dist.model",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # Imported on first use, so that `python -m gptoss_dist.<module>` does not import that module twice.
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gptoss_dist' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
