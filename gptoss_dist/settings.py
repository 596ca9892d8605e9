"""A run's settings as an ml_collections ConfigDict: the model, the mesh, dtypes and paths.

Files under `configs/` call `run_settings` with their model and overrides; every field can then be set on the
command line (`--config.mesh.expert=4`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from gptoss_dist.config import ModelConfig, default_layer_types

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


class SettingsError(ValueError):
    """A setting that cannot be used; the message names it."""


def run_settings(*, model: dict[str, Any], **overrides: Any) -> ml_collections.ConfigDict:
    """Defaults for every setting, with `model` (ModelConfig fields over GPT-OSS-20B's) and overrides."""
    fields = dataclasses.asdict(ModelConfig()) | model
    if "layer_types" not in model:
        fields["layer_types"] = default_layer_types(fields["num_layers"])
    settings = ml_collections.ConfigDict(
        {
            "model": fields,
            "dtype": "bfloat16",  # parameters and compute; "float32" for parity checks
            # experts stay MXFP4 on the device (uint8 blocks and scales, 4.25 bits a weight) and are dequantized a
            # tile at a time inside the expert matmul; the checkpoint must hold MXFP4 experts (a Hugging Face
            # directory as published, or converted with --packed_experts); mesh.tensor must divide
            # intermediate_size / 32
            "packed_experts": False,
            # how the experts run: "auto" (the platform's best: the GPU kernel on GPUs; on TPUs the TPU kernel for
            # packed experts, XLA's grouped matmul for dense ones; else a loop over row blocks), "ragged",
            # "blocked", "gpu_kernel" or "tpu_kernel" (a kernel off its platform runs in Pallas' interpreter)
            "experts_implementation": "auto",
            # how a decode step reads the KV cache's pool: "auto" (on TPUs a Pallas kernel that reads each
            # sequence's own live pages on its data shard, where mesh.tensor divides the KV heads; elsewhere the
            # portable blockwise path, which reads every sequence up to the batch's longest), "blockwise" or
            # "tpu_kernel" (off a TPU in Pallas' interpreter)
            "attention_implementation": "auto",
            "mesh": {"data": 1, "tensor": 1, "expert": 1},
            "checkpoint": "",
            # the batch job (gptoss_dist.generate); the checkpoint, not `model`, defines its model
            "input": "",  # JSONL of requests, local or gs://
            "output": "",  # directory for the results and errors JSONL, local or gs://
            "max_slots": 64,  # sequences in flight
            "max_len": 4096,  # tokens per sequence, prompt and completion; up to the model's max_position_embeddings
            "steps_per_call": 8,  # decode steps per host round trip
            # the full-attention layers' KV cache: a pool of kv_pages pages of page_size positions, taken as sequences
            # grow (page_size must divide max_len; the pool must hold one sequence of max_len). 0, 0: a page of
            # max_len per slot, as many pages as slots. A smaller pool admits requests while their pages are free and
            # preempts (and later recomputes, with the same output) the newest sequence when it runs short
            "page_size": 0,
            "kv_pages": 0,
            # share prompt prefixes: a request (or a request's n samples) whose prompt starts with full pages that
            # the pool holds maps them and prefills only the rest; the sliding layers then keep their keys in the
            # pool too (the whole context instead of a window per slot), so that a cached prefix's window is there
            "prefix_caching": False,
            "min_prefill_len": 16,  # prompt pieces are padded to this length, doubled up: fewer compiled shapes
            # (padded) prompt tokens per prefill call: bounds prefill memory; a longer prompt goes in pieces, each
            # attending to what the cache holds of it, with decode calls in between
            "prefill_tokens": 8192,
            "chip": "",  # the accelerator to plan memory for (gptoss_dist.plan.CHIPS); "" reads the device's
            # several processes: from these or GPTOSS_* variables (gptoss_dist.distributed); on a TPU pod,
            # tpu_pod=True lets JAX find the hosts; a process silent for peer_timeout_s is lost, and the others stop
            "distributed": {"tpu_pod": False, "coordinator": "", "num_processes": 1, "process_id": 0,
                            "cpu_devices": 0, "timeout_s": 300, "peer_timeout_s": 30.0},
            "part_records": 1000,  # remote output: records per uploaded part file...
            "part_seconds": 60.0,  # ...or fewer, once the oldest waiting record is this old
            "retry_errors": False,  # run the input lines that ended in errors again (edited since, or not)
            "lock_timeout_s": 120.0,  # a job's lock on its output not renewed for this long is a dead job's
            "sampling": {"max_new_tokens": 1024, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 0},
            "harmony": {"reasoning_effort": "medium", "current_date": ""},  # "": no date line
            # the terminal chat (gptoss_dist.chat): its developer instructions ("": none), how the reply's
            # analysis channel is shown ("dim", "plain" or "hide"), raw=True for the completion as generated, and
            # a JSON file with a list of function tools ("": none)
            "chat": {"system": "", "show_analysis": "dim", "raw": False, "tools": ""},
        }
    )
    settings.update(overrides)
    return settings


def model_config(settings: ml_collections.ConfigDict) -> ModelConfig:
    return ModelConfig(**settings.model.to_dict())


# The settings that `engine.Engine` takes as keyword arguments of the same names.
ENGINE_SETTINGS = (
    "max_slots", "max_len", "steps_per_call", "min_prefill_len", "prefill_tokens", "page_size", "kv_pages",
    "prefix_caching", "attention_implementation",
)  # fmt: skip


def engine_options(settings: ml_collections.ConfigDict) -> dict[str, Any]:
    """The engine's keyword arguments from the run's settings."""
    return {name: settings[name] for name in ENGINE_SETTINGS}


def plan_options(settings: ml_collections.ConfigDict) -> dict[str, Any]:
    """`plan.plan_memory`'s keyword arguments from the run's settings, but for the chip and the page pool."""
    return {"max_slots": settings.max_slots, "max_len": settings.max_len, "prefill_tokens": settings.prefill_tokens,
            "dtype": np.dtype(dtype(settings)), "packed_experts": settings.packed_experts,
            "rings": not settings.prefix_caching, "steps_per_call": settings.steps_per_call}  # fmt: skip


def dtype(settings: ml_collections.ConfigDict) -> jnp.dtype:
    if settings.dtype not in DTYPES:
        raise SettingsError(f"dtype {settings.dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[settings.dtype]


def check_positive(settings: ml_collections.ConfigDict, *names: str) -> None:
    """Raises SettingsError naming the first of the settings `names` below 1."""
    for name in names:
        if settings[name] < 1:
            raise SettingsError(f"{name} must be at least 1, not {settings[name]}")
