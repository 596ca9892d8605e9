"""Packed experts: MXFP4 blocks and scales kept on the device as the checkpoint stores them, loaded from a
Hugging Face directory or a converted checkpoint, sharded, and giving the dequantized model's logits and
greedy tokens; clear errors where a checkpoint or a mesh cannot hold them."""

import math
import runpy
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

from conftest import small_config
from gptoss_dist import CheckpointError, ModelConfig, from_pretrained, mxfp4, plan, settings
from gptoss_dist.checkpoint import HfCheckpoint
from gptoss_dist.convert import convert
from gptoss_dist.converted import Conversion, array_name, array_specs, read_plan
from gptoss_dist.engine import Request
from gptoss_dist.model import abstract_model, forward
from gptoss_dist.placements import weight_placements
from gptoss_dist.random_checkpoint import write_random_checkpoint
from gptoss_dist.sharding import (
    MESH_AXES,
    MeshError,
    check_model_fits_mesh,
    make_mesh,
    param_specs,
    put,
    spec_divisor,
)
from gptoss_dist.startup import make_engine, planned_mesh
from gptoss_dist.tokenizer import load_tokenizer

CONFIG = small_config()  # intermediate 64: 2 MXFP4 groups, so mesh.tensor may be 1 or 2
EXPERT_TENSORS = {"gate_up": "gate_up_proj", "down": "down_proj"}
tiny_settings = runpy.run_path(str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py"))["get_config"]


def flat_params(model) -> dict:
    return {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model))}


def padded_batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CONFIG.vocab_size, (4, 12)).astype(np.int32)
    mask = (np.arange(12)[None] >= np.array([[0], [3], [0], [7]])).astype(np.int32)
    return tokens, mask


def logits(model, mesh=None) -> np.ndarray:
    tokens, mask = padded_batch()
    if mesh is None:
        return np.asarray(forward(model, jnp.asarray(tokens), jnp.asarray(mask)))
    batch = NamedSharding(mesh, PartitionSpec("data"))
    with jax.set_mesh(mesh):
        return np.asarray(forward(model, put(tokens, batch), put(mask, batch)))


def mesh_of(shape: tuple[int, int, int]):
    return make_mesh(dict(zip(MESH_AXES, shape)), CONFIG, jax.devices()[: math.prod(shape)], packed_experts=True)


@pytest.fixture(scope="module")
def packed(small_checkpoint):
    return from_pretrained(small_checkpoint, dtype=jnp.float32, packed_experts=True)


@pytest.fixture(scope="module")
def dense(small_checkpoint):
    return from_pretrained(small_checkpoint, dtype=jnp.float32)


@pytest.fixture(scope="module")
def converted_packed(small_checkpoint, tmp_path_factory) -> Path:
    destination = tmp_path_factory.mktemp("packed") / "converted"
    convert(str(small_checkpoint), str(destination), dtype="float32", packed_experts=True, show_progress=False)
    return destination


# ------------------------------------------------------------------------------------- loading and values


def test_packed_experts_hold_the_checkpoints_bytes(small_checkpoint, packed):
    ckpt = HfCheckpoint(small_checkpoint)
    for i, mlp in enumerate(layer.mlp for layer in packed.layers):
        assert not hasattr(mlp, "gate_up") and not hasattr(mlp, "down")
        for ours, theirs in EXPERT_TENSORS.items():
            for part in ("blocks", "scales"):
                value = getattr(mlp, f"{ours}_{part}").get_value()
                assert value.dtype == jnp.uint8
                stored = ckpt.read(f"model.layers.{i}.mlp.experts.{theirs}_{part}")
                np.testing.assert_array_equal(value, stored, err_msg=f"layer {i} {ours}_{part}")


def test_decoded_values_are_the_dequantized_models(packed, dense):
    for packed_layer, dense_layer in zip(packed.layers, dense.layers, strict=True):
        for name in EXPERT_TENSORS:
            matrices = mxfp4.PackedMatrices(
                getattr(packed_layer.mlp, f"{name}_blocks")[...], getattr(packed_layer.mlp, f"{name}_scales")[...]
            )
            expected = getattr(dense_layer.mlp, name)[...]
            for e in range(CONFIG.num_experts):
                np.testing.assert_array_equal(matrices.matrix(e, jnp.float32), expected[e])
                np.testing.assert_array_equal(matrices.matrix(e, jnp.bfloat16), expected[e].astype(jnp.bfloat16))


def test_logits_equal_the_dequantized_models_in_float32(packed, dense):
    expected = logits(dense)
    np.testing.assert_allclose(logits(packed), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_logits_equal_the_dequantized_models_in_bfloat16(small_checkpoint):
    expected = logits(from_pretrained(small_checkpoint, dtype=jnp.bfloat16))
    got = logits(from_pretrained(small_checkpoint, dtype=jnp.bfloat16, packed_experts=True))
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-2 * np.abs(expected).max())


def test_non_expert_weights_are_the_dense_models(packed, dense):
    dense_params = flat_params(dense)
    for path, value in flat_params(packed).items():
        if path[-1] not in {f"{name}_{part}" for name in EXPERT_TENSORS for part in ("blocks", "scales")}:
            np.testing.assert_array_equal(value, dense_params[path], err_msg=str(path))


# ------------------------------------------------------------------------------------------- generating


def test_greedy_generations_equal_the_dequantized_models_on_the_tiny_config(tmp_path):
    """Through the batch job's own engine maker, on the tiny config, in shapes that compile once: one prefill
    of every prompt, then decoding."""
    config = tiny_settings()
    config.max_slots, config.max_len, config.min_prefill_len, config.steps_per_call = 4, 64, 32, 2
    config.checkpoint = str(write_random_checkpoint(tmp_path / "tiny-hf", settings.model_config(config), seed=2))
    tokenizer = load_tokenizer(config.checkpoint)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 256, n).tolist() for n in (5, 17, 2, 30)]

    def greedy(packed_experts: bool) -> list[tuple[list[int], str]]:
        config.packed_experts = packed_experts
        engine = make_engine(config, tokenizer, planned_mesh(config, jax.devices()[:1]))
        expert_dtype = engine.params["layers"][0]["mlp"]["down_blocks" if packed_experts else "down"].get_value().dtype
        assert expert_dtype == (jnp.uint8 if packed_experts else jnp.float32)
        results = engine.generate([Request(p, max_new_tokens=24, id=i) for i, p in enumerate(prompts)])
        return [(r.tokens, r.finish_reason) for r in results]

    dense_tokens = greedy(False)
    assert sum(len(tokens) for tokens, _ in dense_tokens) > 40
    assert greedy(True) == dense_tokens


# ----------------------------------------------------------------------------- converted and on a mesh


def test_converted_packed_checkpoint_records_and_holds_the_checkpoints_bytes(converted_packed, packed):
    plan = read_plan(str(converted_packed))
    assert plan["packed_experts"] is True
    assert plan["arrays"]["layers.0.mlp.down_blocks"]["dtype"] == "uint8"
    restored = flat_params(from_pretrained(converted_packed, dtype=jnp.float32, packed_experts=True))
    direct = flat_params(packed)
    assert restored.keys() == direct.keys()
    for path, value in restored.items():
        assert value.dtype == direct[path].dtype, path
        np.testing.assert_array_equal(value, direct[path], err_msg=str(path))


def test_packed_on_a_mesh_equals_unsharded(converted_packed, packed):
    mesh = mesh_of((2, 2, 2))
    sharded = from_pretrained(converted_packed, dtype=jnp.float32, mesh=mesh, packed_experts=True)
    down_blocks = sharded.layers[0].mlp.down_blocks.get_value()
    assert down_blocks.sharding.spec == PartitionSpec("expert", None, "tensor", None)  # the groups over tensor
    assert down_blocks.addressable_shards[0].data.shape == (3, 64, 1, 16)
    expected = logits(packed)
    np.testing.assert_allclose(logits(sharded, mesh), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_a_conversion_resumes_only_with_its_own_expert_layout(tmp_path):
    """Packed and dequantized experts are different plans: a rerun in the other layout starts afresh."""

    def conversion(packed: bool) -> Conversion:
        _, state = nnx.split(abstract_model(CONFIG, packed_experts=packed))
        specs = array_specs(state)
        return Conversion(tmp_path / "out", specs, source="hf", overwrite=False, packed_experts=packed)

    conversion(True).record("layers.0.mlp.down_blocks")
    assert conversion(True).done == {"layers.0.mlp.down_blocks"}
    assert conversion(False).done == set()


def test_every_packed_shard_on_every_mesh_is_made_of_whole_read_chunks():
    cfg = ModelConfig()  # GPT-OSS-20B: 90 MXFP4 groups and 64 heads leave mesh.tensor 1 or 2
    _, state = nnx.split(abstract_model(cfg, packed_experts=True))
    specs = array_specs(state)
    assert specs["layers.0.mlp.down_blocks"].read_chunk == (1, 2880, 45, 16)
    meshes = []
    for tensor in (1, 2, 4, 8):
        for expert in (1, 2, 4, 8, 16, 32):
            sizes = {"data": 1, "tensor": tensor, "expert": expert}
            try:
                check_model_fits_mesh(cfg, sizes, packed_experts=True)
            except MeshError:
                continue
            meshes.append((tensor, expert))
            for path, partition in nnx.to_flat_state(param_specs(state, sizes)):
                spec = specs[array_name(path)]
                for dim, split, chunk in zip(spec.shape, spec_divisor(partition, sizes), spec.read_chunk):
                    assert (dim // split) % chunk == 0, (path, sizes)
    assert {tensor for tensor, _ in meshes} == {1, 2} and len(meshes) == 12


# ------------------------------------------------------------------------------------------------ plan


def test_plan_counts_blocks_and_scales_as_each_chip_holds_them():
    cfg, sizes = ModelConfig(), {"data": 1, "tensor": 2, "expert": 4}
    mesh = AbstractMesh((1, 2, 4), MESH_AXES)
    placements = weight_placements(cfg, sizes, packed_experts=True)
    expected = sum(
        math.prod(NamedSharding(mesh, p.spec).shard_shape(p.shape)) * (p.nbytes // math.prod(p.shape))
        for p in placements
    )
    packed_plan = plan.plan_memory(cfg, sizes, max_slots=8, max_len=1024, packed_experts=True)
    assert packed_plan.weights == expected
    assert 13.5e9 < sum(p.nbytes for p in placements) < 14e9  # as GPT-OSS-20B's published files; bf16: 41.8 GB


# ----------------------------------------------------------------------------------------------- errors


def test_checkpoint_with_dequantized_experts_cannot_stay_packed(tmp_path):
    source = write_random_checkpoint(tmp_path / "hf", CONFIG, seed=1, packed=False)
    message = (
        r"tensor model\.layers\.0\.mlp\.experts\.gate_up_proj is stored dequantized and the checkpoint holds no "
        r"MXFP4 blocks \(model\.layers\.0\.mlp\.experts\.gate_up_proj_blocks\)"
    )
    with pytest.raises(CheckpointError, match=message):
        from_pretrained(source, packed_experts=True)
    with pytest.raises(CheckpointError, match=message):
        convert(str(source), str(tmp_path / "out"), packed_experts=True, show_progress=False)
    assert not (tmp_path / "out").exists()


def test_converted_checkpoint_loads_only_in_its_own_expert_layout(small_checkpoint, converted_packed, tmp_path):
    with pytest.raises(CheckpointError, match=r"converted with packed \(MXFP4\) experts; load it with packed_experts"):
        from_pretrained(converted_packed)
    dense_converted = tmp_path / "dense"
    convert(str(small_checkpoint), str(dense_converted), show_progress=False)
    with pytest.raises(CheckpointError, match="converted with dequantized experts, it holds no MXFP4 blocks"):
        from_pretrained(dense_converted, packed_experts=True)


def test_tensor_axis_must_divide_the_mxfp4_groups():
    sizes = {"data": 1, "tensor": 4, "expert": 1}
    check_model_fits_mesh(CONFIG, sizes)  # 64 intermediate values divide over 4...
    with pytest.raises(MeshError, match=r"2 MXFP4 groups .* mesh\.tensor=4: .* shard the experts over mesh\.expert"):
        mesh_of((1, 4, 1))  # ...but not their 2 groups
