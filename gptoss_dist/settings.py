"""A run's settings as an ml_collections ConfigDict: the model, the mesh, dtypes and paths.

Files under `configs/` call `run_settings` with their model and overrides; every field can then be set on the
command line (`--config.mesh.expert=4`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import ml_collections

from gptoss_dist.config import FULL, SLIDING, ModelConfig

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def run_settings(*, model: dict[str, Any], **overrides: Any) -> ml_collections.ConfigDict:
    """Defaults for every setting, with `model` (ModelConfig fields over GPT-OSS-20B's) and overrides."""
    fields = dataclasses.asdict(ModelConfig()) | model
    if "layer_types" not in model:  # the published pattern: even layers slide
        fields["layer_types"] = tuple(SLIDING if i % 2 == 0 else FULL for i in range(fields["num_layers"]))
    settings = ml_collections.ConfigDict(
        {
            "model": fields,
            "dtype": "bfloat16",  # parameters and compute; "float32" for parity checks
            "mesh": {"data": 1, "tensor": 1, "expert": 1},
            "checkpoint": "",
        }
    )
    settings.update(overrides)
    return settings


def model_config(settings: ml_collections.ConfigDict) -> ModelConfig:
    return ModelConfig(**settings.model.to_dict())


def dtype(settings: ml_collections.ConfigDict) -> jnp.dtype:
    if settings.dtype not in DTYPES:
        raise ValueError(f"dtype {settings.dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[settings.dtype]
