"""The model on meshes of 8 simulated CPU devices: same logits as unsharded and as transformers, weights
split as the rules say, experts never gathered, and clear errors for meshes that do not fit."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from conftest import small_config
from gptoss_dist import from_pretrained
from gptoss_dist.model import GptOss, forward
from gptoss_dist.placements import describe
from gptoss_dist.random_checkpoint import write_random_checkpoint
from gptoss_dist.sharding import (
    MESH_AXES, MeshError, logical_to_spec, make_mesh, mesh_shape, param_formats, put, spec_divisor,
)  # fmt: skip
from reference import load_reference, reference_logits

# 8 query heads over 2 KV heads, 8 experts, intermediate 96: every mesh below divides it, and on
# tensor=8 the 2 KV heads are replicated (the documented rule).
CONFIG = small_config(num_heads=8, num_kv_heads=2, num_experts=8, experts_per_token=3, intermediate_size=96)
MESHES = [(1, 1, 1), (2, 2, 2), (1, 2, 4), (8, 1, 1), (1, 8, 1)]


def mesh_of(shape):
    return make_mesh(dict(zip(MESH_AXES, shape)), CONFIG, jax.devices()[: math.prod(shape)])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("sharded-hf"), CONFIG, seed=2)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    lengths = [20, 13, 20, 5, 17, 20, 9, 20]
    tokens = rng.integers(0, CONFIG.vocab_size, (8, 20)).astype(np.int32)
    mask = (np.arange(20)[None] >= 20 - np.array(lengths)[:, None]).astype(np.int32)  # left padding
    return tokens, mask, lengths


@pytest.fixture(scope="module")
def unsharded_logits(checkpoint, batch):
    tokens, mask, _ = batch
    return np.asarray(forward(from_pretrained(checkpoint, dtype=jnp.float32), jnp.asarray(tokens), jnp.asarray(mask)))


def sharded_logits(model, mesh, tokens, mask):
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    with jax.set_mesh(mesh):
        return forward(model, put(tokens, batch_sharding), put(mask, batch_sharding))


@pytest.mark.parametrize("shape", MESHES, ids=str)
def test_sharded_logits_equal_unsharded_and_transformers(checkpoint, batch, unsharded_logits, shape):
    tokens, mask, lengths = batch
    mesh = mesh_of(shape)
    model = from_pretrained(checkpoint, dtype=jnp.float32, mesh=mesh)
    logits = np.asarray(sharded_logits(model, mesh, tokens, mask))
    np.testing.assert_allclose(logits, unsharded_logits, rtol=0, atol=1e-5)

    reference = load_reference(checkpoint)
    for row in (0, 3):  # a full row and a padded one
        expected = reference_logits(reference, tokens[row, 20 - lengths[row] :])
        np.testing.assert_allclose(logits[row, 20 - lengths[row] :], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 2, 4), (1, 8, 1)], ids=str)
def test_each_device_holds_its_share_of_each_weight(checkpoint, shape):
    mesh = mesh_of(shape)
    sizes = dict(zip(MESH_AXES, shape))
    model = from_pretrained(checkpoint, dtype=jnp.float32, mesh=mesh)
    _, state = nnx.split(model)
    for path, var in nnx.to_flat_state(state):
        array = var.get_value()
        divisor = math.prod(spec_divisor(array.sharding.spec, sizes))
        for shard in array.addressable_shards:
            assert shard.data.nbytes == array.nbytes // divisor, path
    # The rules at work: experts on `expert`, query heads and expert intermediate on `tensor`.
    layer = model.layers[0]
    assert layer.mlp.gate_up[...].sharding.spec == logical_to_spec(
        ("experts", "embed", "expert_mlp"), layer.mlp.gate_up.shape, sizes
    )
    if sizes["expert"] > 1:
        assert layer.mlp.down[...].addressable_shards[0].data.shape[0] == CONFIG.num_experts // sizes["expert"]
    if sizes["tensor"] > 1:
        assert layer.attn.q[...].addressable_shards[0].data.shape[1] == CONFIG.num_heads // sizes["tensor"]


def test_the_expert_matrices_and_the_embedding_are_placed_row_major_and_the_rest_in_the_default_layout():
    mesh = mesh_of((1, 2, 4))
    _, state = nnx.split(nnx.eval_shape(lambda: GptOss(CONFIG)))
    shapes = {path: var.get_value().shape for path, var in nnx.to_flat_state(state)}
    formats = dict(nnx.to_flat_state(param_formats(state, mesh)))
    assert {path[-1] for path, place in formats.items() if place.layout is not None} == {"gate_up", "down", "embed"}
    for path, place in formats.items():
        if place.layout is not None:
            assert place.layout.major_to_minor == tuple(range(len(shapes[path]))), path
        assert place.sharding.mesh is mesh


def test_kv_heads_are_replicated_where_tensor_does_not_divide_them():
    sizes = {"data": 1, "tensor": 8, "expert": 1}
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), sizes) == PartitionSpec(None, None, None)
    assert logical_to_spec(("embed", "q_heads", "head_dim"), (64, 8, 16), sizes) == PartitionSpec(None, "tensor", None)


def test_sampling_rows_spread_over_every_device_and_else_over_data():
    """A decode step's logits [rows, vocabulary] are sampled a row a device where the rows divide over the whole
    mesh; where they do not, over `data` as the batch is; where they do not divide over `data` either, it is an
    error, as for the batch."""
    sizes = {"data": 2, "tensor": 2, "expert": 2}
    axes = ("sampling_rows", None)
    assert logical_to_spec(axes, (16, 64), sizes) == PartitionSpec(("data", "tensor", "expert"), None)
    assert logical_to_spec(axes, (4, 64), sizes) == PartitionSpec("data", None)
    assert logical_to_spec(axes, (8, 64), {"data": 1, "tensor": 8, "expert": 1}) == PartitionSpec("tensor", None)
    with pytest.raises(MeshError, match="axis 'batch' of size 3 does not divide over mesh axes"):
        logical_to_spec(axes, (3, 64), sizes)


def test_compiled_forward_never_gathers_expert_weights(checkpoint, batch):
    tokens, mask, _ = batch
    mesh = mesh_of((2, 2, 2))
    model = from_pretrained(checkpoint, dtype=jnp.float32, mesh=mesh)
    graphdef, state = nnx.split(model)

    def run(state, tokens, mask):
        return nnx.merge(graphdef, state)(tokens, mask)

    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    with jax.set_mesh(mesh):
        hlo = jax.jit(run).lower(state, put(tokens, batch_sharding), put(mask, batch_sharding)).compile().as_text()
    hidden, inter, experts = CONFIG.hidden_size, CONFIG.intermediate_size, CONFIG.num_experts
    # Every shape an expert weight or its shard can take on this mesh.
    expert_dims = {(hidden, 2 * inter), (hidden, inter), (inter, hidden), (inter // 2, hidden)}
    gathers = re.findall(r"= \S+\[([\d,]*)\][^\n]* all-gather(?:-start)?\(", hlo)
    assert "all-reduce" in hlo  # the experts' partial sums are combined...
    for dims in gathers:  # ...and nothing gathers their weights
        shape = tuple(int(d) for d in dims.split(",") if d)
        assert not (len(shape) == 3 and shape[1:] in expert_dims and shape[0] <= experts), shape


@pytest.mark.parametrize(
    "mesh, message",
    [
        ({"data": 3, "tensor": 1, "expert": 1}, "has 3 devices but there are 8"),
        ({"data": -1, "tensor": -1, "expert": 1}, "only one axis may be -1"),
        ({"data": -1, "tensor": 3, "expert": 1}, "8 devices do not divide by 3"),
        ({"data": 1, "tensor": 1, "expert": 0}, "must be positive"),
    ],
)
def test_bad_mesh_sizes_are_refused(mesh, message):
    with pytest.raises(MeshError, match=message):
        mesh_shape(mesh, 8)


@pytest.mark.parametrize(
    "change, mesh, message",
    [
        ({"num_experts": 6}, (1, 1, 4), "6 experts do not divide over mesh.expert=4"),
        ({"num_heads": 4}, (1, 8, 1), "4 query heads do not divide over mesh.tensor=8"),
        ({"intermediate_size": 100}, (1, 8, 1), "intermediate size 100 does not divide"),
        ({"vocab_size": 100}, (1, 2, 4), "vocabulary 100 does not divide"),
    ],
)
def test_meshes_that_do_not_fit_the_model_are_refused(change, mesh, message):
    cfg = small_config(**({"num_heads": 8, "num_kv_heads": 2, "num_experts": 8} | change))
    with pytest.raises(MeshError, match=message):
        make_mesh(dict(zip(MESH_AXES, mesh)), cfg, jax.devices()[: math.prod(mesh)])


def test_minus_one_takes_the_remaining_devices():
    assert mesh_shape({"data": -1, "tensor": 2, "expert": 2}, 8) == {"data": 2, "tensor": 2, "expert": 2}


def test_description_of_the_20b_model_on_a_mesh():
    from gptoss_dist.config import ModelConfig

    sizes = {"data": 1, "tensor": 4, "expert": 2}
    text = describe(ModelConfig(), sizes)
    lines = {line.split()[0]: line for line in text.splitlines()[1:-1]}
    assert "P('expert', None, 'tensor')" in lines["layers.0.mlp.gate_up"]
    # 32 experts x 2880 x 5760 bf16, split 8 ways
    assert lines["layers.0.mlp.gate_up"].endswith(f"{32 * 2880 * 5760 * 2 // 8:,}")
    assert "P(('tensor', 'expert'), None)" in lines["embed"]
    assert len(lines) == 3 + 24 * 17  # every weight is listed
    assert "bytes per device" in text.splitlines()[-1]


def test_placements_command_prints_the_plan_and_refuses_bad_meshes():
    import subprocess
    import sys

    from pathlib import Path

    config = Path(__file__).parents[1] / "configs" / "gpt_oss_20b.py"
    command = [sys.executable, "-m", "gptoss_dist.placements", f"--config={config}"]
    ok = subprocess.run([*command, "--config.mesh.tensor=4", "--config.mesh.expert=2"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[-1].startswith("mesh (data=1, tensor=4, expert=2):")
    bad = subprocess.run([*command, "--config.mesh.expert=3"], capture_output=True, text=True)
    assert bad.returncode != 0 and "32 experts do not divide over mesh.expert=3" in bad.stderr
