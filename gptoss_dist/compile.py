"""`gptoss-compile`: will the job fit a TPU pod? Compile its programs for a TPU topology, on any machine.

    pip install -e '.[tpu]'   # libtpu: the real TPU compiler; no TPU needed
    python -m gptoss_dist.compile --config=configs/gpt_oss_20b.py --config.mesh.tensor=8 --topology=v6e:2x4

The settings are the job's (`gptoss_dist.settings`, `--config.*` as for `gptoss-generate`); the model is the
config file's `model`, as for `gptoss_dist.plan`. The decode call and the prefill call a long prompt's pieces
take (every prefill call shape with `--all_buckets`) are compiled by the TPU compiler for the topology's
abstract devices (any name `jax.experimental.topologies.get_topology_desc` takes: v5e:2x4, v6e:2x2,
v5p:2x2x2, tpu7x:2x2x1, ...), with abstract weights, cache and inputs in their shardings: nothing is read or
allocated. Per program and per chip it prints XLA's `memory_analysis()` (arguments: the weights and the
cache; aliases: the donated cache; temporaries), the total (arguments + outputs - aliases + temporaries)
against the chip's HBM, the compile time, the collectives in the optimized program by kind (a loop body's
once) with the bytes they produce, and `gptoss_dist.plan`'s working memory for the program beside XLA's
temporaries. `--json` prints one JSON object instead. Exits 1 if a program does not fit (XLA's
RESOURCE_EXHAUSTED included), 2 on bad settings.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
from flax import nnx
from jax.experimental import topologies

from gptoss_dist import plan, settings
from gptoss_dist.config import ConfigError
from gptoss_dist.engine import Engine
from gptoss_dist.exit_codes import EXIT_CANNOT_START, EXIT_DOES_NOT_FIT
from gptoss_dist.model import abstract_model
from gptoss_dist.sharding import MeshError, make_mesh, mesh_sizes, param_formats

GiB = plan.GiB
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# An HLO instruction that makes a collective: `name = SHAPE op(` or the `-done` half of an async pair, whose
# shape is what the collective produced (the `-start` half is skipped: it would count the operands too).
_COLLECTIVE = re.compile(r"=\s+(?P<shape>.+?)\s+(?P<op>" + "|".join(COLLECTIVES) + r")(?P<half>-start|-done)?\(")
_ARRAY = re.compile(r"\b(?P<dtype>[a-z]+[0-9]*(?:e[0-9]m[0-9][a-z0-9]*)?)\[(?P<dims>[0-9,]*)\]")
_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "f16": 16, "bf16": 16, "s32": 32,
         "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64}  # fmt: skip


class CompileSettingsError(ValueError):
    """A topology, mesh or setting that cannot be compiled for; the message names it."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU topology's abstract devices, the chip's name and memory per device, and its hosts."""

    name: str
    devices: list[jax.Device]
    chip: str
    hbm_bytes: int

    @property
    def hosts(self) -> int:
        return len({device.process_index for device in self.devices})


@dataclasses.dataclass
class Program:
    """One compiled program's per-chip figures (None where it did not compile), and its collectives."""

    name: str
    argument_bytes: int | None
    output_bytes: int | None
    alias_bytes: int | None
    temp_bytes: int | None
    hbm_bytes: int
    compile_s: float
    collectives: dict[str, dict[str, int]]
    error: str | None = None

    @property
    def total_bytes(self) -> int | None:
        if self.error is not None:
            return None
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def fits(self) -> bool:
        return self.error is None and self.total_bytes <= self.hbm_bytes

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total_bytes": self.total_bytes, "fits": self.fits}


@dataclasses.dataclass
class Report:
    """What `gptoss-compile` found for a topology and the job's settings."""

    topology: Topology
    mesh: dict[str, int]
    plan: plan.MemoryPlan
    programs: list[Program]

    @property
    def fits(self) -> bool:
        return all(program.fits for program in self.programs)

    def to_json(self) -> dict[str, Any]:
        topology = self.topology
        return {
            "topology": topology.name, "chip": topology.chip, "devices": len(topology.devices),
            "hosts": topology.hosts, "mesh": self.mesh, "fits": self.fits, "libtpu": libtpu_version(),
            "plan": {"weights_bytes": self.plan.weights, "kv_cache_bytes": self.plan.kv_cache,
                     "decode_working_bytes": self.plan.decode_working,
                     "prefill_working_bytes": self.plan.prefill_working, "working_bytes": self.plan.working,
                     "total_bytes": self.plan.total},
            "programs": [program.to_json() for program in self.programs],
        }  # fmt: skip


# ------------------------------------------------------------------------------------------ the topology


def libtpu_version() -> str | None:
    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return None


def load_topology(name: str) -> Topology:
    """The abstract devices of the TPU topology `name`; CompileSettingsError if libtpu is missing or the name
    is not a topology, or its chip's memory is not known (`plan.CHIPS`)."""
    # Only the presence of libtpu is checked here: JAX loads it when asked for a topology.
    if importlib.util.find_spec("libtpu") is None:
        raise CompileSettingsError("libtpu is not installed: pip install -e '.[tpu]' (jax[tpu]) to compile for a TPU")
    # Compiling takes no TPU, so it need not hold libtpu's one-process lock: it can run beside a job on the TPU
    # or another compile (libtpu reads this as it loads).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        devices = list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except (jax.errors.JaxRuntimeError, RuntimeError, ValueError) as err:
        raise CompileSettingsError(f"topology {name!r}: {str(err).splitlines()[0]}") from None
    chip = plan.chip_name(devices[0].device_kind)
    if chip is None:
        raise CompileSettingsError(f"topology {name!r}: the memory of a {devices[0].device_kind!r} is not known")
    return Topology(name, devices, chip, plan.CHIPS[chip])


# --------------------------------------------------------------------------------- the job's programs


def sharded_abstract_model(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> nnx.Module:
    """The settings' model with every weight a ShapeDtypeStruct in its sharding and layout on `mesh`: nothing
    allocated."""
    model = abstract_model(settings.model_config(config), dtype=settings.dtype(config),
                           packed_experts=config.packed_experts,
                           experts_implementation=config.experts_implementation)  # fmt: skip
    graphdef, state = nnx.split(model)
    state = jax.tree.map(
        lambda var, place: var.replace(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=place)),
        state, param_formats(state, mesh), is_leaf=lambda x: isinstance(x, nnx.Variable),
    )  # fmt: skip
    return nnx.merge(graphdef, state)


def abstract_engine(config: ml_collections.ConfigDict, topology: Topology) -> Engine:
    """The job's engine on every device of `topology`, with an abstract model; CompileSettingsError naming a
    setting that does not fit the model, the devices or the engine."""
    settings.check_positive(config, "max_slots", "max_len", "steps_per_call", "min_prefill_len", "prefill_tokens")
    model_config = settings.model_config(config)
    model_config.check_max_len(config.max_len)
    mesh = make_mesh(config.mesh, model_config, topology.devices, packed_experts=config.packed_experts)
    try:
        return Engine(sharded_abstract_model(config, mesh), mesh, **settings.engine_options(config))
    except ValueError as err:
        raise CompileSettingsError(str(err)) from None


def job_programs(engine: Engine, all_buckets: bool) -> dict[str, Callable[[], jax.stages.Lowered]]:
    """The job's programs by name, each a lowering: decode, then the prefill call of a long prompt's pieces
    (the fewest rows, the widest), or every prefill call shape."""
    longest = (engine.row_buckets[0], engine.length_buckets[-1])
    shapes = engine.prefill_call_shapes() if all_buckets else [longest]
    programs = {f"decode {engine.steps_per_call} steps": engine.lower_decode}
    for rows, width in shapes:
        programs[f"prefill {rows}x{width}"] = lambda rows=rows, width=width: engine.lower_prefill(rows, width)
    return programs


def plan_for(config: ml_collections.ConfigDict, engine: Engine, chip: str) -> plan.MemoryPlan:
    return plan.plan_memory(engine.config, mesh_sizes(engine.mesh), pool=(engine.page_size, engine.kv_pages),
                            chip=chip, **settings.plan_options(config))


# ------------------------------------------------------------------------------------------ compiling


def collectives(hlo: str) -> dict[str, dict[str, int]]:
    """The collectives of an optimized HLO module by kind: how many, and the bytes they produce per chip (each
    instruction once, a loop body's too)."""
    found: dict[str, dict[str, int]] = collections.defaultdict(lambda: {"count": 0, "bytes": 0})
    for match in _COLLECTIVE.finditer(hlo):
        if match["half"] == "-start":
            continue
        entry = found[match["op"]]
        entry["count"] += 1
        entry["bytes"] += shape_bytes(match["shape"])
    return dict(sorted(found.items()))


def shape_bytes(shape: str) -> int:
    """The bytes of an HLO shape, an array (`bf16[8,64]{1,0}`) or a tuple of them."""
    bits = 0
    for array in _ARRAY.finditer(shape):
        dims = [int(d) for d in array["dims"].split(",") if d]
        bits += math.prod(dims) * _BITS.get(array["dtype"], 8)
    return bits // 8


def planned_working(estimate: plan.MemoryPlan, program: str) -> int:
    """The plan's working memory for the program named `program` (a `job_programs` name)."""
    return estimate.decode_working if program.startswith("decode") else estimate.prefill_working


def compile_program(name: str, lower: Callable[[], jax.stages.Lowered], hbm_bytes: int) -> Program:
    """Compiles one program; one that XLA finds too large for the chip's memory is reported, not raised."""
    start = time.perf_counter()
    try:
        compiled = lower().compile()
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        first_line = str(err).strip().splitlines()[0]
        return Program(name, None, None, None, None, hbm_bytes, round(time.perf_counter() - start, 1), {},
                       error=first_line)  # fmt: skip
    seconds = round(time.perf_counter() - start, 1)
    memory = compiled.memory_analysis()
    return Program(name, memory.argument_size_in_bytes, memory.output_size_in_bytes, memory.alias_size_in_bytes,
                   memory.temp_size_in_bytes, hbm_bytes, seconds, collectives(compiled.as_text()))  # fmt: skip


def compile_job(
    config: ml_collections.ConfigDict, topology: Topology, *, all_buckets: bool = False,
    progress: Callable[[str], None] = lambda _: None,
) -> Report:  # fmt: skip
    """Compiles the job's programs for `topology`; CompileSettingsError (or the settings', the model's or the
    mesh's error) for settings it cannot compile."""
    engine = abstract_engine(config, topology)
    programs = []
    for name, lower in job_programs(engine, all_buckets).items():
        progress(f"compiling {name}")
        programs.append(compile_program(name, lower, topology.hbm_bytes))
    return Report(topology, mesh_sizes(engine.mesh), plan_for(config, engine, topology.chip), programs)


# ------------------------------------------------------------------------------------------- the report


def _gib(count: int | None) -> str:
    return "-" if count is None else f"{count / GiB:.3f}"


def _collectives_line(found: dict[str, dict[str, int]]) -> str:
    parts = [f"{kind} x{entry['count']} ({entry['bytes'] / 2**20:.2f} MiB)" for kind, entry in found.items()]
    return "collectives: " + (", ".join(parts) if parts else "none")


def render(report: Report) -> str:
    """The report as text: the topology, the plan, then a row per program (GiB per chip) and its collectives."""
    topology, estimate = report.topology, report.plan
    mesh = ", ".join(f"{axis}={size}" for axis, size in report.mesh.items())
    lines = [
        (f"{topology.name}: {len(topology.devices)} {topology.chip} devices on {topology.hosts} host(s), "
         f"{topology.hbm_bytes / GiB:.2f} GiB each; mesh {mesh}; libtpu {libtpu_version()}"),
        (f"plan, per chip: weights {_gib(estimate.weights)}, KV cache {_gib(estimate.kv_cache)}, "
         f"working {_gib(estimate.decode_working)} (decode), {_gib(estimate.prefill_working)} (prefill), "
         f"total {_gib(estimate.total)} GiB"),
        (f"{'program':<24}{'arguments':>10}{'outputs':>10}{'aliases':>10}{'temporary':>10}{'plan':>10}"
         f"{'total':>10}{'of HBM':>8}  fits{'compile':>10}"),
    ]  # fmt: skip
    for program in report.programs:
        used = "-" if program.total_bytes is None else f"{program.total_bytes / program.hbm_bytes:.0%}"
        figures = [program.argument_bytes, program.output_bytes, program.alias_bytes, program.temp_bytes,
                   planned_working(estimate, program.name), program.total_bytes]  # fmt: skip
        lines.append(f"{program.name:<24}" + "".join(f"{_gib(f):>10}" for f in figures)
                     + f"{used:>8}  {'yes' if program.fits else 'no ':<4}{program.compile_s:>9.1f}s")  # fmt: skip
        lines.append("    " + (program.error or _collectives_line(program.collectives)))
    lines.append(f"(GiB per chip; {'every program fits' if report.fits else 'a program does NOT fit'})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    from absl import app, flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, "A run config (configs/*.py).", lock_config=True)
    topology = flags.DEFINE_string("topology", None, "A TPU topology, as jax's get_topology_desc takes it.")
    as_json = flags.DEFINE_bool("json", False, "Print one JSON object.")
    all_buckets = flags.DEFINE_bool("all_buckets", False, "Compile every prefill call shape, not only the largest.")

    def run(_):
        jax.config.update("jax_platforms", "cpu")  # compiling for the topology needs no TPU backend
        try:
            if not topology.value:
                raise CompileSettingsError("no topology: set --topology (v5e:2x4, v6e:2x2, ...)")
            found = load_topology(topology.value)
            report = compile_job(config.value, found, all_buckets=all_buckets.value,
                                 progress=lambda line: print(f"gptoss-compile: {line}", file=sys.stderr))  # fmt: skip
        except (CompileSettingsError, settings.SettingsError, ConfigError, MeshError) as err:
            print(f"gptoss-compile: error: {err}", file=sys.stderr)
            sys.exit(EXIT_CANNOT_START)
        print(json.dumps(report.to_json()) if as_json.value else render(report))
        sys.exit(0 if report.fits else EXIT_DOES_NOT_FIT)

    app.run(run, argv=list(argv) if argv is not None else None)


if __name__ == "__main__":
    main()
