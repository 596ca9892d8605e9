"""`from_pretrained`: a model from a checkpoint directory in either format, the published Hugging Face layout
(`gptoss_dist.checkpoint`) or converted by `gptoss-convert` (`gptoss_dist.store`), local or on `gs://`."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from gptoss_dist import store
from gptoss_dist.checkpoint import HfCheckpoint, iter_params
from gptoss_dist.model import GptOss, abstract_model
from gptoss_dist.sharding import param_shardings, put


def from_pretrained(
    path: str | Path,
    *,
    dtype=jnp.bfloat16,
    compute_dtype=None,
    mesh: jax.sharding.Mesh | None = None,
    packed_experts: bool = False,
) -> GptOss:
    """Loads a model from a checkpoint directory in the published Hugging Face layout, or converted by
    `gptoss-convert` (`gptoss_dist.store`); either may be local or on `gs://`.

    `dtype` is the parameters' dtype (bfloat16 for serving, float32 for parity); `compute_dtype` defaults to
    it. Tensors are read and placed one at a time; with a `mesh`, each goes straight into its sharding (run
    the model under `jax.set_mesh(mesh)`). With `packed_experts` the expert weights stay MXFP4 (uint8 blocks
    and scales, copied as the checkpoint stores them); the checkpoint must store them so.
    """
    if store.is_converted(path):
        return store.load(path, dtype=dtype, compute_dtype=compute_dtype, mesh=mesh, packed_experts=packed_experts)
    ckpt = HfCheckpoint(path)
    model = abstract_model(ckpt.config(), dtype=dtype, compute_dtype=compute_dtype, packed_experts=packed_experts)
    graphdef, state = nnx.split(model)
    shardings = dict(nnx.to_flat_state(param_shardings(state, mesh))) if mesh is not None else {}
    flat = dict(nnx.to_flat_state(state))
    for param, value in iter_params(ckpt, state, packed_experts=packed_experts):
        value = value.astype(flat[param].get_value().dtype)
        flat[param].set_value(put(value, shardings[param]) if mesh is not None else jax.device_put(value))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
