"""What both front ends, the batch job (`gptoss_dist.generate`) and the chat (`gptoss_dist.chat`), start with:
the settings that loading the model and generating read, checked; the mesh, checked against the chips'
memory before any weight is read; the engine over the checkpoint's model (stopping on the stop tokens of the
checkpoint's tokenizer, which both load with `tokenizer.load_tokenizer`)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import ml_collections

from gptoss_dist import plan, records, settings
from gptoss_dist.checkpoint import read_config
from gptoss_dist.engine import Engine, page_pool
from gptoss_dist.loading import from_pretrained
from gptoss_dist.model import ATTENTION_IMPLEMENTATIONS, EXPERTS_IMPLEMENTATIONS
from gptoss_dist.sharding import make_mesh, mesh_sizes
from gptoss_dist.tokenizer import Tokenizer


class StartError(Exception):
    """A front end that cannot start: the message names the setting or the file."""


def check_engine_settings(config: ml_collections.ConfigDict) -> records.Sampling:
    """The sampling defaults, once the settings that loading the model and generating read are checked (the
    job's and the chat's); StartError or SettingsError naming the one that is not."""
    check_given(config, "checkpoint")
    settings.check_positive(config, "max_len", "steps_per_call", "min_prefill_len", "prefill_tokens")
    check_one_of("experts_implementation", config.experts_implementation, EXPERTS_IMPLEMENTATIONS)
    check_one_of("attention_implementation", config.attention_implementation, ATTENTION_IMPLEMENTATIONS)
    check_one_of("harmony.reasoning_effort", config.harmony.reasoning_effort, records.REASONING_EFFORTS)
    try:
        page_pool(config.max_slots, config.max_len, config.page_size, config.kv_pages)
        return records.sampling_defaults(config.sampling)
    except ValueError as err:
        raise StartError(str(err)) from None


def check_one_of(name: str, value: str, choices: Sequence[str]) -> None:
    """Refuses a setting `name` whose value is not one of `choices`."""
    if value not in choices:
        raise StartError(f"{name} must be one of {tuple(choices)}")


def check_given(config: ml_collections.ConfigDict, name: str) -> None:
    """Refuses an empty setting `name`."""
    if not config[name]:
        raise StartError(f"no {name}: set --config.{name}")


def planned_mesh(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None) -> jax.sharding.Mesh:
    """The configured mesh, once the checkpoint's model is known to fit it: refuses, before any weight is
    read, a run whose weights, KV cache and working memory exceed a chip (naming the setting to turn)."""
    model_config = read_config(config.checkpoint)
    model_config.check_max_len(config.max_len)
    mesh = make_mesh(config.mesh, model_config, devices, packed_experts=config.packed_experts)
    try:
        pool = page_pool(config.max_slots, config.max_len, config.page_size, config.kv_pages, mesh_sizes(mesh)["data"])
        memory = plan.chip_memory(config.chip, jax.local_devices()[0])
        if memory is not None:
            need = plan.plan_memory(model_config, mesh_sizes(mesh), pool=pool, chip=memory[0],
                                    **settings.plan_options(config))
            plan.check_fits(need, memory[1], memory[0])
    except ValueError as err:  # a PlanError, or a pool that does not split into data shards of a sequence each
        raise StartError(str(err)) from None
    return mesh


def make_engine(config: ml_collections.ConfigDict, tokenizer: Tokenizer, mesh: jax.sharding.Mesh) -> Engine:
    """The checkpoint's model on `mesh`, in an engine that stops on the tokenizer's stop tokens."""
    model = from_pretrained(config.checkpoint, dtype=settings.dtype(config), mesh=mesh,
                            packed_experts=config.packed_experts,
                            experts_implementation=config.experts_implementation)  # fmt: skip
    try:
        return Engine(model, mesh, stop_tokens=tokenizer.stop_token_ids, **settings.engine_options(config))
    except ValueError as err:
        raise StartError(str(err)) from None
