"""gptoss-convert: a Hugging Face checkpoint to an orbax checkpoint, locally and on GCS (a real GCS API on
loopback), restored by plain orbax and by from_pretrained on meshes with the arrays and logits of the Hugging
Face directory; chunks that suit every mesh; clear errors for bad input; a killed conversion that resumes,
and a checkpoint without orbax's commit refused."""

import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from conftest import small_config
from gptoss_dist import CheckpointError, ModelConfig, from_pretrained
from gptoss_dist.config import FULL, SLIDING
from gptoss_dist.convert import convert, main
from gptoss_dist.converted import (
    PROGRESS_FILE,
    array_name,
    array_specs,
    read_plan,
    specs_of,
    working_directory,
)
from gptoss_dist.model import abstract_model, forward
from gptoss_dist.paths import filesystem
from gptoss_dist.random_checkpoint import write_random_checkpoint
from gptoss_dist.sharding import MESH_AXES, MeshError, check_model_fits_mesh, make_mesh, param_specs, put, spec_divisor
from test_checkpoint import layer_file, rewrite_without

pytest_plugins = ["gcs_emulator"]

CONFIG = small_config()
MESHES = [(1, 1, 1), (2, 2, 2)]
TOKENIZER = b'{"model": "stands in for tokenizer.json"}'


def logits_on(path, shape) -> np.ndarray:
    """float32 logits of a left-padded batch, the model loaded from `path` onto a mesh of `shape`."""
    mesh = make_mesh(dict(zip(MESH_AXES, shape)), CONFIG, jax.devices()[: math.prod(shape)])
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CONFIG.vocab_size, (4, 12)).astype(np.int32)
    mask = (np.arange(12)[None] >= np.array([[0], [3], [0], [7]])).astype(np.int32)
    model = from_pretrained(path, dtype=jnp.float32, mesh=mesh)
    batch = NamedSharding(mesh, PartitionSpec("data"))
    with jax.set_mesh(mesh):
        return np.asarray(forward(model, put(tokens, batch), put(mask, batch)))


@pytest.fixture(scope="module")
def source(small_checkpoint, tmp_path_factory):
    """The small Hugging Face checkpoint with a tokenizer file."""
    directory = shutil.copytree(small_checkpoint, tmp_path_factory.mktemp("convert") / "hf")
    (directory / "tokenizer.json").write_bytes(TOKENIZER)
    return directory


@pytest.fixture(scope="module")
def local_converted(source, tmp_path_factory):
    destination = tmp_path_factory.mktemp("converted") / "ckpt"
    convert(str(source), str(destination), dtype="float32", show_progress=False)
    return str(destination)


@pytest.fixture(scope="module")
def gcs_converted(source, gcs_bucket):
    """Converted from a copy of the source on gs:// to gs://."""
    fs = filesystem(gcs_bucket)
    for file in source.iterdir():
        fs.put_file(str(file), f"{gcs_bucket}/hf/{file.name}")
    convert(f"{gcs_bucket}/hf", f"{gcs_bucket}/converted", dtype="float32", show_progress=False)
    return f"{gcs_bucket}/converted"


@pytest.fixture(scope="module")
def hugging_face_logits(source) -> dict[tuple[int, ...], np.ndarray]:
    """The Hugging Face directory's logits on each mesh, computed once for both places."""
    return {shape: logits_on(source, shape) for shape in MESHES}


@pytest.mark.parametrize("shape", MESHES, ids=str)
@pytest.mark.parametrize("where", ["local", "gcs"])
def test_converted_checkpoint_gives_the_logits_of_the_hugging_face_one(request, source, hugging_face_logits, where,
                                                                       shape):  # fmt: skip
    converted = request.getfixturevalue(f"{where}_converted")
    np.testing.assert_array_equal(logits_on(converted, shape), hugging_face_logits[shape])
    fs = filesystem(converted)
    assert fs.cat_file(f"{converted}/tokenizer.json") == TOKENIZER
    assert fs.cat_file(f"{converted}/config.json") == (source / "config.json").read_bytes()
    assert not fs.exists(f"{converted}/{PROGRESS_FILE}")


def test_bfloat16_conversion_in_the_smallest_pieces_holds_the_weights_a_direct_load_holds(source, tmp_path):
    """One read chunk per write chunk and per block read from the source: every slicing path at work."""
    convert(str(source), str(tmp_path / "bf16"), show_progress=False, write_chunk_bytes=1, read_block_bytes=1)
    specs = specs_of(read_plan(str(tmp_path / "bf16")))
    assert specs["unembed"].write_chunk == (64, 128 // 8) and specs["layers.0.mlp.gate_up"].write_chunk[0] == 3
    restored = nnx.to_flat_state(nnx.state(from_pretrained(tmp_path / "bf16")))
    direct = dict(nnx.to_flat_state(nnx.state(from_pretrained(source))))
    for path, var in restored:
        assert var.get_value().dtype == jnp.bfloat16, path
        np.testing.assert_array_equal(var.get_value(), direct[path].get_value(), err_msg=str(path))


# Restores converted checkpoints with orbax alone (argv: JSON {where: path}, JSON {array: partition spec}, the
# .npz to write): the tree and dtypes from orbax's metadata, the shardings from the given specs, on meshes
# (1, 1, 1) and (2, 2, 2) of the 8 CPU devices, with StandardCheckpointer and (on the larger mesh) v1's
# load_pytree.
PLAIN_ORBAX_RESTORE = """
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 8)
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec
from orbax.checkpoint import v1

paths, specs, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
specs = {name: PartitionSpec(*(tuple(a) if isinstance(a, list) else a for a in spec)) for name, spec in specs.items()}
restored = {}
for where, path in paths.items():
    tree = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
    for shape in ((1, 1, 1), (2, 2, 2)):
        mesh = jax.make_mesh(shape, ("data", "tensor", "expert"), devices=jax.devices()[: int(np.prod(shape))])
        name = lambda keys: ".".join(key.key for key in keys)
        target = jax.tree_util.tree_map_with_path(
            lambda keys, leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, specs[name(keys)])),
            tree)
        restores = {"standard": ocp.StandardCheckpointer().restore} | ({"v1": v1.load_pytree} if shape[0] > 1 else {})
        for how, restore in restores.items():
            for keys, array in jax.tree_util.tree_flatten_with_path(restore(path, target))[0]:
                assert array.sharding == NamedSharding(mesh, specs[name(keys)]), name(keys)
                restored[f"{how} {where} {shape} {name(keys)}"] = np.asarray(array)
np.savez(out, **restored)
"""


def test_plain_orbax_restores_the_converted_arrays_on_a_mesh(local_converted, gcs_converted, tmp_path):
    """orbax, jax and numpy alone (no gptoss_dist) restore what from_pretrained loads, locally and on gs://, with
    StandardCheckpointer and with v1's load_pytree."""
    _, state = nnx.split(abstract_model(CONFIG, dtype=jnp.float32))
    specs = {array_name(path): list(spec) for path, spec in
             nnx.to_flat_state(param_specs(state, {"data": 2, "tensor": 2, "expert": 2}))}  # fmt: skip
    paths = {"local": local_converted, "gcs": gcs_converted}
    command = [sys.executable, "-c", PLAIN_ORBAX_RESTORE, json.dumps(paths), json.dumps(specs), str(tmp_path / "r.npz")]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    restored = np.load(tmp_path / "r.npz")
    expected = {array_name(path): np.asarray(var.get_value()) for path, var in
                nnx.to_flat_state(nnx.state(from_pretrained(local_converted, dtype=jnp.float32)))}  # fmt: skip
    assert len(restored.files) == 6 * len(expected)  # 2 places, 2 meshes, and v1 on one mesh in each place
    for key in restored.files:
        np.testing.assert_array_equal(restored[key], expected[key.rsplit(" ", 1)[1]], err_msg=key)


# Two layers, one of each kind, of each model's widths and experts: more layers repeat the same arrays' specs.
TWO_LAYERS = {"num_layers": 2, "layer_types": (SLIDING, FULL)}
GPT_OSS_20B = dataclasses.replace(ModelConfig(), **TWO_LAYERS)
GPT_OSS_120B = dataclasses.replace(ModelConfig(), num_experts=128, **TWO_LAYERS)


@pytest.mark.parametrize("cfg", [GPT_OSS_20B, GPT_OSS_120B], ids=["20b", "120b"])
def test_every_shard_on_every_mesh_is_made_of_whole_read_chunks(cfg):
    _, state = nnx.split(abstract_model(cfg))
    specs = array_specs(state)
    assert specs["layers.0.mlp.gate_up"].read_chunk == (1, 2880, 90)  # one expert, 1/64 of the intermediate
    assert specs["layers.0.attn.q"].read_chunk == (2880, 1, 64)  # one head
    assert specs["unembed"].read_chunk == (2880, 201088 // 128)
    assert all(math.prod(spec.write_chunk) * 2 <= 64 << 20 for spec in specs.values())
    meshes = 0
    for tensor in (1, 2, 4, 8, 16, 32, 64):
        for expert in (1, 2, 4, 8, 16, 32, 64, 128):
            sizes = {"data": 1, "tensor": tensor, "expert": expert}
            try:
                check_model_fits_mesh(cfg, sizes)
            except MeshError:
                continue
            meshes += 1
            for path, partition in nnx.to_flat_state(param_specs(state, sizes)):
                spec = specs[array_name(path)]
                for dim, split, chunk in zip(spec.shape, spec_divisor(partition, sizes), spec.read_chunk):
                    assert (dim // split) % chunk == 0, (path, sizes)
    assert meshes > 20


# Restores a converted checkpoint (argv: coordinator, process id, path) onto a mesh (1, 4, 2) spread over two
# processes of four CPU devices, checks each shard against the Hugging Face directory loaded the same way,
# and reports the bytes that tensorstore read from files.
RESTORE_IN_ONE_OF_TWO_PROCESSES = """
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 4)
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import numpy as np, tensorstore as ts
from flax import nnx
from gptoss_dist import from_pretrained
from gptoss_dist.checkpoint import read_config
from gptoss_dist.sharding import make_mesh

path, source = sys.argv[3], sys.argv[4]
mesh = make_mesh({"data": 1, "tensor": 4, "expert": 2}, read_config(path))
converted = nnx.to_flat_state(nnx.state(from_pretrained(path, mesh=mesh)))
(read,) = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read")
direct = dict(nnx.to_flat_state(nnx.state(from_pretrained(source, mesh=mesh))))
for param, var in converted:
    for mine, theirs in zip(var.get_value().addressable_shards, direct[param].get_value().addressable_shards):
        assert mine.index == theirs.index and np.array_equal(mine.data, theirs.data), param
print("RESULT", json.dumps({"bytes_read": read["values"][0]["value"]}), flush=True)
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def restore_in_a_process(process_id: int, coordinator: str, converted, source) -> subprocess.Popen:
    command = [sys.executable, "-c", RESTORE_IN_ONE_OF_TWO_PROCESSES, coordinator, str(process_id), str(converted)]
    return subprocess.Popen([*command, str(source)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_each_process_reads_only_the_chunks_its_devices_hold(source, tmp_path):
    converted = tmp_path / "bf16"
    convert(str(source), str(converted), show_progress=False)
    coordinator = f"127.0.0.1:{free_port()}"
    processes = [restore_in_a_process(i, coordinator, converted, source) for i in range(2)]
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    lines = [line for output in outputs for line in output.splitlines() if line.startswith("RESULT ")]
    reads = [json.loads(line.removeprefix("RESULT "))["bytes_read"] for line in lines]
    arrays = [array for array in converted.iterdir() if (array / "zarr.json").exists()]
    stored = sum(file.stat().st_size for array in arrays for file in array.rglob("*") if file.is_file())
    assert len(reads) == 2 and sum(reads) >= stored  # between them, they read every chunk...
    assert max(reads) < 0.6 * stored, (reads, stored)  # ...each about half: what its devices hold


# ------------------------------------------------------------------------------------------ bad input


def break_missing_shard(directory):
    layer_file(directory, 1).unlink()


def break_truncated_file(directory):
    path = layer_file(directory, 0)
    path.write_bytes(path.read_bytes()[:-100])


def break_shape(directory):
    name = "model.layers.2.mlp.router.bias"
    rewrite_without(directory, name, (name, np.zeros(5, np.float32)))


def break_unknown_names(directory):
    """A config.json of two layers: the third layer's tensors are unknown."""
    config = json.loads((directory / "config.json").read_text())
    config |= {"num_hidden_layers": 2, "layer_types": config["layer_types"][:2]}
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "damage, message",
    [
        (break_missing_shard, r"model-00002-of-00004\.safetensors: missing"),
        (break_truncated_file, r"model-00001-of-00004\.safetensors: truncated"),
        (break_shape, r"tensor model\.layers\.2\.mlp\.router\.bias has shape \(5,\)"),
        (break_unknown_names, r"tensors that config\.json does not describe: model\.layers\.2\."),
    ],
    ids=lambda x: x.__name__ if callable(x) else "",
)
def test_bad_input_fails_clearly_and_marks_nothing_complete(source, tmp_path, damage, message):
    broken = shutil.copytree(source, tmp_path / "hf")
    damage(broken)
    with pytest.raises(SystemExit, match=message) as exit:
        main([f"--src={broken}", f"--dst={tmp_path / 'out'}", "--no-progress"])
    assert str(exit.value.code).startswith("gptoss-convert: error: ")  # printed to stderr, exit status 1
    assert not (tmp_path / "out").exists()


def delete_chunk(fs, path: str) -> None:
    fs.rm(path)


def truncate_chunk(fs, path: str) -> None:
    fs.pipe_file(path, fs.cat_file(path)[:-100])


@pytest.mark.parametrize(
    "damage, says",
    [
        (delete_chunk, r"NOT_FOUND: chunk \{[\d, ]+\} .*/c/0/0/0\"? is missing"),
        (truncate_chunk, r"DATA_LOSS: .*/c/0/0/0"),
    ],
    ids=["deleted", "truncated"],
)
@pytest.mark.parametrize("where", ["local", "gcs"])
def test_a_missing_or_damaged_chunk_fails_the_load_naming_the_array(request, where, damage, says, tmp_path):
    """As a partial copy leaves a checkpoint: never zeros, always an error that names the array."""
    converted = request.getfixturevalue(f"{where}_converted")
    fs = filesystem(converted)
    copy = str(tmp_path / "copy") if where == "local" else f"{converted}-{damage.__name__}"
    fs.copy(f"{converted}/", copy, recursive=True)
    array = f"{copy}/layers.1.mlp.gate_up"
    damage(fs, f"{array}/c/0/0/0")
    with pytest.raises(CheckpointError, match=rf"{array}, elements \[0:6, 0:64, 0:128\]: {says}"):
        from_pretrained(copy)


def uncommitted_copy(fs, converted: str, copy: str) -> None:
    """A copy as orbax leaves a checkpoint before its commit: locally its temporary directory, not yet renamed;
    on gs:// the checkpoint without commit_success.txt."""
    fs.copy(f"{converted}/", working_directory(copy), recursive=True)
    if fs.exists(f"{copy}/commit_success.txt"):
        fs.rm(f"{copy}/commit_success.txt")


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_a_checkpoint_without_orbaxs_commit_is_refused_naming_it(request, where, tmp_path):
    converted = request.getfixturevalue(f"{where}_converted")
    fs = filesystem(converted)
    copy = str(tmp_path / "copy") if where == "local" else f"{converted}-uncommitted"
    uncommitted_copy(fs, converted, copy)
    message = rf"{copy}: a converted checkpoint without orbax's commit \(Expected .*\); run gptoss-convert again"
    with pytest.raises(CheckpointError, match=message):
        from_pretrained(copy)


def test_complete_destination_is_refused_unless_overwrite(source, tmp_path):
    destination = tmp_path / "out"
    convert(str(source), str(destination), show_progress=False)
    command = [sys.executable, "-m", "gptoss_dist.convert", f"--src={source}", f"--dst={destination}", "--no-progress"]
    refused = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1
    assert "already holds a complete converted checkpoint; pass --overwrite" in refused.stderr
    convert(str(source), str(destination), dtype="float32", overwrite=True, show_progress=False)
    assert read_plan(str(destination))["arrays"]["embed"]["dtype"] == "float32"


def test_destination_holding_other_files_is_refused(source, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty and not a converted checkpoint"):
        convert(str(source), str(tmp_path), show_progress=False, overwrite=True)


# ------------------------------------------------------------------------------------ interruption


@pytest.fixture(scope="module")
def larger_source(tmp_path_factory):
    """A checkpoint whose conversion takes a couple of seconds."""
    cfg = small_config(
        hidden_size=256, intermediate_size=512, num_experts=16, num_layers=4, layer_types=(SLIDING, FULL) * 2
    )
    return write_random_checkpoint(tmp_path_factory.mktemp("larger-hf"), cfg, seed=3)


def wait_for_an_array(progress_path, process, timeout_s=60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if json.loads(progress_path.read_text())["done"]:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.005)
    raise AssertionError(f"no array recorded in {progress_path} before the converter ended ({process.poll()})")


def test_conversion_killed_and_run_again_ends_complete_and_correct(larger_source, tmp_path, caplog):
    destination = tmp_path / "out"
    working = Path(working_directory(destination))  # orbax's temporary directory, renamed at the commit
    command = [sys.executable, "-m", "gptoss_dist.convert", f"--src={larger_source}", f"--dst={destination}",
               "--dtype=float32", "--no-progress"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_an_array(working / PROGRESS_FILE, process)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert not destination.exists(), "the converter committed the checkpoint before it was killed"
    with pytest.raises(CheckpointError, match=rf"{destination}: a converted checkpoint without orbax's commit "
                                              r"\(\d+ of \d+ arrays written; .*\); run gptoss-convert again"):  # fmt: skip
        from_pretrained(destination)

    done = json.loads((working / PROGRESS_FILE).read_text())["done"]
    kept_mtime = (working / done[0] / "zarr.json").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="gptoss_dist.convert"):
        convert(str(larger_source), str(destination), dtype="float32", show_progress=False)
    assert f"resuming: {len(done)} of" in caplog.text
    assert (destination / done[0] / "zarr.json").stat().st_mtime_ns == kept_mtime  # the killed run's, kept
    assert not working.exists() and not (destination / PROGRESS_FILE).exists()

    restored = dict(nnx.to_flat_state(nnx.state(from_pretrained(destination, dtype=jnp.float32))))
    for path, var in nnx.to_flat_state(nnx.state(from_pretrained(larger_source, dtype=jnp.float32))):
        np.testing.assert_array_equal(restored[path].get_value(), var.get_value(), err_msg=str(path))
