"""Reading the Hugging Face layout: configs in both forms, and clear errors for bad checkpoints."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import small_config
from gptoss_dist import CheckpointError, ConfigError, ModelConfig, from_pretrained
from gptoss_dist.checkpoint import INDEX_FILE, HfCheckpoint
from gptoss_dist.config import FULL, SLIDING
from gptoss_dist.model import forward
from gptoss_dist.random_checkpoint import write_random_checkpoint, write_safetensors
from gptoss_dist.sharding import make_mesh

PUBLISHED_20B = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "eos_token_id": 200002,
    "experts_per_token": 4, "head_dim": 64, "hidden_size": 2880, "initial_context_length": 4096,
    "intermediate_size": 2880, "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64,
    "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 8, "num_local_experts": 32,
    "rms_norm_eps": 1e-05, "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
    "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "sliding_window": 128, "swiglu_limit": 7.0, "tie_word_embeddings": False,
    "vocab_size": 201088,
}  # fmt: skip


def test_published_config_reads_as_the_20b_architecture():
    assert ModelConfig.from_hf_dict(PUBLISHED_20B) == ModelConfig()


def test_transformers5_config_form_reads_the_same():
    import transformers

    hf = transformers.GptOssConfig(**{k: v for k, v in PUBLISHED_20B.items() if k != "rope_scaling"})
    assert "rope_theta" in hf.rope_parameters  # transformers 5 keeps the rope settings here
    form = hf.to_dict()
    form.pop("rope_scaling", None)
    form.pop("rope_theta", None)
    assert ModelConfig.from_hf_dict(form) == ModelConfig()


def test_config_round_trips_through_the_published_form():
    cfg = small_config(experts_per_token=2, layer_types=(FULL, SLIDING, FULL))
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


@pytest.mark.parametrize(
    "change, message",
    [
        ({"layer_types": ["sliding_attention"] * 3}, "layer_types has 3 entries"),
        ({"layer_types": ["local"] * 24}, "'local'"),
        ({"num_key_value_heads": 7}, "not a multiple"),
        ({"num_experts_per_tok": 40}, "experts_per_token=40"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "'linear' is not supported"),
    ],
)
def test_inconsistent_configs_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_dict(PUBLISHED_20B | change)


@pytest.fixture
def checkpoint(tmp_path, small_checkpoint):
    return shutil.copytree(small_checkpoint, tmp_path / "ckpt")


def layer_file(directory, layer: int):
    return directory / json.loads((directory / INDEX_FILE).read_text())["weight_map"][
        f"model.layers.{layer}.self_attn.q_proj.weight"
    ]


def rewrite_without(directory, name: str, replacement=None):
    """Rewrites the file holding `name` without it (or with `replacement`: (name, array))."""
    from gptoss_dist.checkpoint import SafetensorsFile

    index = json.loads((directory / INDEX_FILE).read_text())
    path = directory / index["weight_map"][name]
    source = SafetensorsFile(path)
    kept = [(n, source.read(n)) for n in source.tensors if n != name]
    if replacement is not None:
        kept.append(replacement)
    write_safetensors(path, [(n, a.shape, a.dtype, lambda a=a: [a]) for n, a in kept])


def test_missing_tensor_is_named(checkpoint):
    rewrite_without(checkpoint, "model.layers.1.self_attn.sinks")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.sinks"):
        from_pretrained(checkpoint)


def test_wrong_shape_names_the_tensor_and_file(checkpoint):
    name = "model.layers.2.mlp.router.bias"
    rewrite_without(checkpoint, name, (name, np.zeros(5, np.float32)))
    with pytest.raises(CheckpointError, match=r"model-00003-of-00004\.safetensors: tensor model\.layers\.2\.mlp\.router\.bias has shape \(5,\)"):  # noqa: E501
        from_pretrained(checkpoint)


def test_config_that_disagrees_with_the_tensors(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps(config | {"head_dim": 8}))
    with pytest.raises(CheckpointError, match="but config.json implies"):
        from_pretrained(checkpoint)
    config_layers = config | {"num_hidden_layers": 2, "layer_types": config["layer_types"][:2]}
    (checkpoint / "config.json").write_text(json.dumps(config_layers))
    with pytest.raises(CheckpointError, match=r"does not describe: model\.layers\.2\."):
        from_pretrained(checkpoint)


def test_truncated_safetensors_file_is_named(checkpoint):
    path = layer_file(checkpoint, 0)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"{path.name}: truncated"):
        from_pretrained(checkpoint)


def test_missing_shard_file_is_named(checkpoint):
    path = layer_file(checkpoint, 1)
    path.unlink()
    with pytest.raises(CheckpointError, match=rf"{path.name}: missing"):
        HfCheckpoint(checkpoint)


def test_missing_config_and_garbage_files_are_named(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        from_pretrained(checkpoint)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        from_pretrained(checkpoint / "nowhere")


def test_single_file_checkpoint_without_index(tmp_path, small_checkpoint):
    """Several files without an index, or one model.safetensors, load the same."""
    directory = shutil.copytree(small_checkpoint, tmp_path / "noindex")
    (directory / INDEX_FILE).unlink()
    tokens = jnp.arange(10)[None]
    expected = forward(from_pretrained(small_checkpoint, dtype=jnp.float32), tokens)
    np.testing.assert_array_equal(forward(from_pretrained(directory, dtype=jnp.float32), tokens), expected)


def test_random_checkpoint_is_deterministic(tmp_path):
    cfg = small_config(num_layers=1, layer_types=(SLIDING,))
    a = write_random_checkpoint(tmp_path / "a", cfg, seed=7)
    b = write_random_checkpoint(tmp_path / "b", cfg, seed=7)
    for file in sorted(a.glob("*.safetensors")):
        assert file.read_bytes() == (b / file.name).read_bytes()


def test_shards_read_a_row_at_a_time_hold_the_whole_tensors_values(small_checkpoint):
    """Each device's shard of every weight, its MXFP4 experts decoded one row (one expert, one vocabulary
    entry) at a time, equals the weight read whole."""
    whole = {path: np.asarray(var.get_value()) for path, var in
             nnx.to_flat_state(nnx.state(from_pretrained(small_checkpoint, dtype=jnp.float32)))}  # fmt: skip
    mesh = make_mesh({"data": 2, "tensor": 2, "expert": 2}, small_config(), jax.devices()[:8])
    sharded = from_pretrained(small_checkpoint, dtype=jnp.float32, mesh=mesh, read_block_bytes=1)
    sharded = nnx.to_flat_state(nnx.state(sharded))
    for path, var in sharded:
        value = var.get_value()
        assert len({shard.device for shard in value.addressable_shards}) == 8
        for shard in value.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), whole[path][shard.index], err_msg=str(path))
