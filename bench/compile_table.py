"""BENCHMARKS.md's table of memory per TPU chip: `gptoss_dist.compile`'s programs for each model, expert format,
topology and (max_slots, max_len), compiled one at a time, each program's figures appended as a JSON line.

    python bench/compile_table.py --out=bench/results/compile_table.jsonl [--programs=decode,prefill]
    python bench/compile_table.py --out=bench/results/compile_table.jsonl --replan   # the plan's figures only
    python bench/compile_table.py --out=... --programs=decode --kinds=20B-bf16 --topologies=v6e:2x4 \
        --settings=64x8192   # only these cases

All decode calls are compiled before any prefill call (decode is the one whose memory grows with the batch).
A case already in `--out` is skipped, so a stopped run resumes. The mesh puts 8 devices (the KV heads) on
`tensor` for bf16 experts, 2 for packed ones (`tensor` must divide intermediate_size / 32 = 90), the rest on
`expert`. `largest_slots_8192` extrapolates from a (64, 8192) decode: the cache grows with the slots, the
weights do not, and the temporaries are taken as they are at 64 slots.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax
from common import load_settings

from gptoss_dist import compile as tpu_compile

ROOT = Path(__file__).parents[1]

MODELS = {"20B": "configs/gpt_oss_20b.py", "120B": "configs/gpt_oss_120b.py"}
TOPOLOGIES = ["v6e:2x4", "v5e:2x4", "v5e:4x4", "v6e:2x2", "v5p:2x2x1", "v5p:2x2x2", "tpu7x:2x2x1"]
SETTINGS = [(64, 8192), (8, 131072)]
PACKED_TENSOR = 2


def cases() -> list[tuple[str, bool, str, int, int]]:
    """(model, packed, topology, max_slots, max_len), the issue's headline cases first."""
    first = [("20B", False, "v6e:2x4", 64, 8192), ("120B", True, "v6e:2x4", 64, 8192)]
    rest = [(model, packed, topology, slots, length) for slots, length in SETTINGS for topology in TOPOLOGIES
            for model in MODELS for packed in (False, True)]  # fmt: skip
    return first + [case for case in rest if case not in first]


def kind(model: str, packed: bool) -> str:
    """A case's model and expert format as `--kinds` names them: 20B-bf16, 120B-packed, ..."""
    return f"{model}-{'packed' if packed else 'bf16'}"


def selected(case: tuple[str, bool, str, int, int], kinds: str, topologies: str, settings: str) -> bool:
    """Whether `case` is among the comma-separated kinds, topologies and settings (SLOTSxLEN); empty: all."""
    model, packed, topology, slots, length = case
    chosen = ((kinds, kind(model, packed)), (topologies, topology), (settings, f"{slots}x{length}"))
    return all(not names or name in names.split(",") for names, name in chosen)


def mesh_for(devices: int, packed: bool) -> dict[str, int]:
    tensor = min(devices, PACKED_TENSOR if packed else 8)
    return {"data": 1, "tensor": tensor, "expert": devices // tensor}


def key(record: dict) -> tuple:
    return (record["model"], record["packed"], record["topology"], record["max_slots"], record["max_len"],
            record["program"])  # fmt: skip


def run_case(model: str, packed: bool, topology: tpu_compile.Topology, slots: int, length: int, program: str):
    config = case_settings(model, packed, len(topology.devices), slots, length)
    engine = tpu_compile.abstract_engine(config, topology)
    programs = tpu_compile.job_programs(engine, all_buckets=False)
    name, lower = next((name, lower) for name, lower in programs.items() if name.startswith(program))
    compiled = tpu_compile.compile_program(name, lower, topology.hbm_bytes)
    return {"model": model, "packed": packed, "topology": topology.name, "chip": topology.chip,
            "max_slots": slots, "max_len": length, "program": program, "mesh": tpu_compile.mesh_sizes(engine.mesh),
            "libtpu": tpu_compile.libtpu_version(), **plan_fields(engine, config, name),
            **compiled.to_json()}  # fmt: skip


def case_settings(model: str, packed: bool, devices: int, slots: int, length: int):
    config = load_settings(str(ROOT / MODELS[model]), {"packed_experts": packed, "max_slots": slots,
                                                        "max_len": length})  # fmt: skip
    config.mesh.update(mesh_for(devices, packed))
    return config


def plan_fields(engine, config, name: str) -> dict[str, int]:
    """The plan's figures for a case's program: weights, cache, and its working memory beside XLA's
    temporaries."""
    plan = tpu_compile.plan_for(config, engine)
    return {"plan_weights_bytes": plan.weights, "plan_kv_cache_bytes": plan.kv_cache,
            "plan_working_bytes": tpu_compile.planned_working(plan, name)}  # fmt: skip


def replan(out: Path) -> None:
    """Recomputes the plan's figures of every record in `out` (no compile), rewriting it atomically."""
    records = [json.loads(line) for line in out.read_text().splitlines()]
    for record in records:
        topology = tpu_compile.load_topology(record["topology"])
        config = case_settings(record["model"], record["packed"], len(topology.devices), record["max_slots"],
                               record["max_len"])  # fmt: skip
        engine = tpu_compile.abstract_engine(config, topology)
        name = record.get("name") or record["program"]
        record.update(plan_fields(engine, config, name))
    temporary = out.with_suffix(".tmp")
    temporary.write_text("".join(json.dumps(record) + "\n" for record in records))
    os.replace(temporary, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--programs", default="decode,prefill")
    parser.add_argument("--replan", action="store_true", help="recompute the plan's figures in --out; no compile")
    parser.add_argument("--kinds", default="", help="only these, comma-separated: 20B-bf16,120B-packed,...")
    parser.add_argument("--topologies", default="", help="only these, comma-separated")
    parser.add_argument("--settings", default="", help="only these, comma-separated SLOTSxLEN: 64x8192,...")
    args = parser.parse_args()
    jax.config.update("jax_platforms", "cpu")
    out = Path(args.out)
    if args.replan:
        replan(out)
        return
    done = {key(json.loads(line)) for line in out.read_text().splitlines()} if out.exists() else set()
    for program in args.programs.split(","):
        for case in cases():
            model, packed, topology_name, slots, length = case
            if (*case, program) in done or not selected(case, args.kinds, args.topologies, args.settings):
                continue
            topology = tpu_compile.load_topology(topology_name)
            start = time.perf_counter()
            try:
                record = run_case(model, packed, topology, slots, length, program)
            except Exception as err:  # noqa: BLE001 - a case that cannot compile is recorded, and the next runs
                record = {"model": model, "packed": packed, "topology": topology_name, "max_slots": slots,
                          "max_len": length, "program": program, "error": f"{type(err).__name__}: {err}"[:500],
                          "compile_s": round(time.perf_counter() - start, 1)}  # fmt: skip
            with out.open("a") as file:  # one line per case, appended whole: a stopped run loses only its case
                file.write(json.dumps(record) + "\n")
                file.flush()
                os.fsync(file.fileno())
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
