"""gptoss-compile: the job's decode and prefill calls, compiled by the real TPU compiler (libtpu) for a TPU
topology's abstract devices on this CPU machine; XLA's per-chip memory against the chip's HBM; the exit status
and JSON a launcher reads. A 2-layer tiny model keeps each compile to seconds."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gptoss_dist import compile as tpu_compile
from gptoss_dist.config import FULL, SLIDING
from gptoss_dist.engine import Engine
from gptoss_dist.exit_codes import EXIT_CANNOT_START, EXIT_DOES_NOT_FIT
from gptoss_dist.settings import SettingsError
from gptoss_dist.sharding import MeshError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="needs libtpu: pip install -e '.[tpu]'"
)

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "tiny.py"
# Two layers (one of each kind), short contexts: the programs' structure at the least compile time.
SMALL = {"model.num_layers": 2, "model.layer_types": (SLIDING, FULL), "max_slots": 4, "max_len": 64,
         "prefill_tokens": 64, "steps_per_call": 2}  # fmt: skip
# One sliding layer of the 20B's widths, in `model.*` settings.
LAYER_OF_20B = {"model.hidden_size": 2880, "model.intermediate_size": 2880, "model.num_heads": 64,
                "model.num_kv_heads": 8, "model.head_dim": 64, "model.num_experts": 32, "model.num_layers": 1,
                "model.layer_types": (SLIDING,)}  # fmt: skip
PROGRAM_KEYS = {"name", "argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "total_bytes", "hbm_bytes",
                "fits", "compile_s", "collectives"}  # fmt: skip


def small_settings(mesh: tuple[int, int, int]):
    spec = importlib.util.spec_from_file_location("tiny", TINY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.update_from_flattened_dict(SMALL)
    config.mesh.update(dict(zip(("data", "tensor", "expert"), mesh)))
    return config


def compiled(config, topology_name: str, program: str = "decode") -> tuple[tpu_compile.Program, Engine]:
    """The settings' decode call (or largest prefill call) compiled for the topology, and the abstract engine it
    came from."""
    topology = tpu_compile.load_topology(topology_name)
    engine = tpu_compile.abstract_engine(config, topology)
    programs = tpu_compile.job_programs(engine, all_buckets=False)
    name, lower = next((name, lower) for name, lower in programs.items() if name.startswith(program))
    return tpu_compile.compile_program(name, lower, topology.hbm_bytes), engine


def cli(*flags: str) -> subprocess.CompletedProcess:
    overrides = [f"--config.{key}={value}" for key, value in SMALL.items() if key != "model.layer_types"]
    command = [sys.executable, "-m", "gptoss_dist.compile", f"--config={TINY}", *overrides,
               f"--config.model.layer_types=('{SLIDING}', '{FULL}')", *flags]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.parametrize("mesh", [(1, 4, 1), (2, 2, 1), (1, 2, 2)], ids=str)
def test_tiny_compiles_on_v5e_2x2(mesh):
    topology = tpu_compile.load_topology("v5e:2x2")
    report = tpu_compile.compile_job(small_settings(mesh), topology)
    assert (topology.chip, len(topology.devices), topology.hosts) == ("v5e", 4, 1)
    assert report.mesh == dict(zip(("data", "tensor", "expert"), mesh))
    rows = mesh[0]  # a prefill call has a row per data shard, of the prefill tokens shared out
    assert [program.name for program in report.programs] == ["decode 2 steps", f"prefill {rows}x{64 // rows}"]
    for program in report.programs:
        assert program.fits
        # each chip holds at least its shard of the weights and of the cache, as the plan counts them
        assert program.argument_bytes >= report.plan.weights + report.plan.kv_cache
        assert program.alias_bytes > 0  # the cache is donated: updated in place
        assert program.collectives  # a mesh of 4 devices exchanges activations


def test_two_host_topology_compiles_and_prints_json():
    done = cli("--topology=v5e:2x4", "--config.mesh.tensor=8", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert {"topology", "chip", "devices", "hosts", "mesh", "fits", "programs"} <= set(report)
    assert (report["topology"], report["chip"], report["devices"], report["hosts"]) == ("v5e:2x4", "v5e", 8, 2)
    assert report["mesh"] == {"data": 1, "tensor": 8, "expert": 1} and report["fits"]
    for program in report["programs"]:
        assert PROGRAM_KEYS <= set(program) and program["fits"]
        assert program["total_bytes"] == (program["argument_bytes"] + program["output_bytes"]
                                          - program["alias_bytes"] + program["temp_bytes"])  # fmt: skip
        assert program["hbm_bytes"] == 16 << 30
        assert program["collectives"]["all-reduce"]["count"] > 0  # tensor parallel: partial sums are added


def test_a_setting_too_big_for_the_chip_does_not_fit():
    """1,024 slots of 131,072 tokens: 32 GiB of cache per v5e chip (one full-attention layer, float32, its 2 KV
    heads whole on each of the 4 chips)."""
    done = cli("--topology=v5e:2x2", "--config.mesh.tensor=4", "--config.max_slots=1024",
               "--config.max_len=131072", "--json")  # fmt: skip
    assert done.returncode == EXIT_DOES_NOT_FIT, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["fits"] is False
    assert all(not program["fits"] for program in report["programs"])


def test_a_bad_setting_exits_2_naming_it():
    done = cli("--topology=v5e:9y9")
    assert done.returncode == EXIT_CANNOT_START
    assert "gptoss-compile: error: topology 'v5e:9y9'" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "mesh, setting, error, message",
    [((1, 3, 1), {}, MeshError, "mesh {'data': 1, 'tensor': 3, 'expert': 1} has 3 devices but there are 4"),
     ((1, 4, 1), {"prefill_tokens": 0}, SettingsError, "prefill_tokens must be at least 1, not 0"),
     ((4, 1, 1), {"max_slots": 6}, tpu_compile.CompileSettingsError, "max_slots=6 must be a multiple")],
    ids=["mesh", "prefill_tokens", "max_slots"],
)  # fmt: skip
def test_settings_that_cannot_compile_are_refused_before_compiling(mesh, setting, error, message):
    config = small_settings(mesh)
    config.update(setting)
    with pytest.raises(error, match=re.escape(message)):
        tpu_compile.compile_job(config, tpu_compile.load_topology("v5e:2x2"))


@pytest.mark.parametrize("topology", ["v6e:2x2", "v5p:2x2x1", "v5e:2x2"])
def test_decode_samples_a_chip_s_rows_reads_the_pool_in_place_and_the_plan_is_within_15_percent_of_xla(topology):
    """One full-attention layer of 64-wide heads and the 20B's vocabulary, 64 slots x 16,384 positions: the
    decode call's temporaries are sampling's float32 rows of the whole vocabulary, a chip's 16 of the 64 slots
    (12.3 MiB a buffer; a v5p holds four in HBM, a v6e and a v5e one), as the plan models them. Under 64 MiB:
    sampling every slot's row on every chip took more, and so did the copy of the layer's pool (256 MiB a chip)
    that the TPU compiler made for each step while attention read and wrote the pool in pieces that did not match
    its layout."""
    config = small_settings((1, 2, 2))
    config.update_from_flattened_dict({"model.num_layers": 1, "model.layer_types": (FULL,), "model.head_dim": 64,
                                       "model.vocab_size": 201088, "dtype": "bfloat16", "max_slots": 64,
                                       "max_len": 16384, "steps_per_call": 1})  # fmt: skip
    decode, engine = compiled(config, topology)
    estimate = tpu_compile.plan_for(config, engine, tpu_compile.load_topology(topology).chip)
    assert decode.temp_bytes < 64 << 20 < estimate.kv_cache, (decode.temp_bytes, estimate.kv_cache)
    assert 0.85 <= estimate.decode_working / decode.temp_bytes <= 1.15, (estimate.decode_working, decode.temp_bytes)


def test_on_tpu7x_the_plan_counts_the_weights_a_decode_loop_re_tiles():
    """tpu7x's matmuls read bf16 weights in (16, 128) tiles, the parameters have (8, 128): a decode call of 2
    steps copies a layer of the 20B's widths (q, k, v, o, router, the experts' gate_up and the unembedding; not
    the experts' down, 360 rows a chip at tensor 8) before its loop. The plan counts those copies on tpu7x,
    within 15% of XLA's temporaries, and no copy on a v6e."""
    config = small_settings((1, 8, 1))
    config.update_from_flattened_dict({**LAYER_OF_20B, "model.vocab_size": 201088, "dtype": "bfloat16"})
    decode, engine = compiled(config, "tpu7x:2x2x1")
    on_tpu7x, on_v6e = (tpu_compile.plan_for(config, engine, chip).decode_working for chip in ("tpu7x", "v6e"))
    assert 0.85 <= on_tpu7x / decode.temp_bytes <= 1.15, (on_tpu7x, decode.temp_bytes)
    assert on_v6e < 0.1 * decode.temp_bytes, (on_v6e, decode.temp_bytes)


@pytest.mark.parametrize("topology", ["v6e:2x4", "v5p:2x2x2"])
def test_prefill_runs_the_experts_in_chunks_and_the_plan_is_within_15_percent_of_xla(topology):
    """A layer of the 20B's widths, one prefill call of 8,192 tokens: the experts take them 4,096 at a time, so
    XLA's temporaries are copies of the residual stream (45 MiB each; a v5p holds more of them) and one chunk's
    token copies, as the plan models them (on v6e 372 MiB; 511 MiB in one chunk, 876 MiB with the float32 copies
    of every token's rows that the experts made before the chunks)."""
    config = small_settings((1, 8, 1))
    config.update_from_flattened_dict({**LAYER_OF_20B, "dtype": "bfloat16", "prefill_tokens": 8192, "max_len": 8192})
    prefill, engine = compiled(config, topology, "prefill")
    planned = tpu_compile.plan_for(config, engine, tpu_compile.load_topology(topology).chip).prefill_working
    assert prefill.name == "prefill 1x8192" and prefill.temp_bytes < 450 << 20, prefill.temp_bytes
    assert 0.85 <= planned / prefill.temp_bytes <= 1.15, (planned, prefill.temp_bytes)


def test_collectives_are_counted_by_kind_with_the_bytes_they_produce():
    hlo = """
      %all-reduce.1 = f32[8,64]{1,0} all-reduce(f32[8,64]{1,0} %x), replica_groups={{0,1}}, to_apply=%add
      %ag-start = (bf16[4,16]{1,0}, bf16[8,16]{1,0}) all-gather-start(bf16[4,16]{1,0} %y), dimensions={0}
      %ag-done = bf16[8,16]{1,0} all-gather-done((bf16[4,16]{1,0}, bf16[8,16]{1,0}) %ag-start)
      %all-reduce.2 = (f32[2]{0}, s32[3]{0}) all-reduce(f32[2]{0} %a, s32[3]{0} %b), to_apply=%add
      %not-one = f32[4]{0} add(f32[4]{0} %p, f32[4]{0} %q)
    """
    assert tpu_compile.collectives(hlo) == {
        "all-gather": {"count": 1, "bytes": 8 * 16 * 2},
        "all-reduce": {"count": 2, "bytes": 8 * 64 * 4 + 2 * 4 + 3 * 4},
    }
