"""BENCHMARKS.md's table of memory per TPU chip: `gptoss_dist.compile`'s programs for each model, expert format,
topology and (max_slots, max_len), compiled one at a time, each program's figures appended as a JSON line.

    python bench/compile_table.py --out=bench/results/compile_table.jsonl [--programs=decode,prefill]
    python bench/compile_table.py --out=bench/results/compile_table.jsonl --replan   # the plan's figures only
    python bench/compile_table.py --out=... --programs=decode --kinds=20B-bf16 --topologies=v6e:2x4 \
        --settings=64x8192   # only these cases
    python bench/compile_table.py --out=... --largest --kinds=20B-bf16 --topologies=v6e:2x4
    python bench/compile_table.py --out=... --largest --research   # again, after a change to the model's code
    python bench/compile_table.py --out=... --table   # BENCHMARKS.md's table from the records; no compile

All decode calls are compiled before any prefill call (decode is the one whose memory grows with the batch).
A case already in `--out` is skipped, so a stopped run resumes. The mesh puts 8 devices (the KV heads) on
`tensor` for bf16 experts, 2 for packed ones (`tensor` must divide intermediate_size / 32 = 90), the rest on
`expert`. `--largest` searches the largest `max_slots` whose decode call fits at `max_len` 8192, in steps of
SLOT_STEP, compiling each step (it starts from `extrapolated_slots`, and gallops and bisects from there);
`--table` shows the compiled bounds
where there are some, else the extrapolation.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
SLOT_STEP = 32
BASE_SLOTS, LARGEST_LEN = SETTINGS[0]  # `--largest` searches at this max_len, from the call of this many slots
GIB, MIB = 1 << 30, 1 << 20


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
            "libtpu": tpu_compile.libtpu_version(), **plan_fields(engine, config, topology.chip, name),
            **compiled.to_json()}  # fmt: skip


def case_settings(model: str, packed: bool, devices: int, slots: int, length: int):
    config = load_settings(str(ROOT / MODELS[model]), {"packed_experts": packed, "max_slots": slots,
                                                        "max_len": length})  # fmt: skip
    config.mesh.update(mesh_for(devices, packed))
    return config


def plan_fields(engine, config, chip: str, name: str) -> dict[str, int]:
    """The plan's figures for a case's program on `chip`: weights, cache, and its working memory beside XLA's
    temporaries."""
    plan = tpu_compile.plan_for(config, engine, chip)
    return {"plan_weights_bytes": plan.weights, "plan_kv_cache_bytes": plan.kv_cache,
            "plan_working_bytes": tpu_compile.planned_working(plan, name)}  # fmt: skip


def replan(out: Path) -> None:
    """Recomputes the plan's figures of every record in `out` (no compile), rewriting it atomically."""
    records = read_records(out)
    for record in records:
        topology = tpu_compile.load_topology(record["topology"])
        config = case_settings(record["model"], record["packed"], len(topology.devices), record["max_slots"],
                               record["max_len"])  # fmt: skip
        engine = tpu_compile.abstract_engine(config, topology)
        name = record.get("name") or record["program"]
        record.update(plan_fields(engine, config, topology.chip, name))
    temporary = out.with_suffix(".tmp")
    temporary.write_text("".join(json.dumps(record) + "\n" for record in records))
    os.replace(temporary, out)


def read_records(out: Path) -> list[dict]:
    """The records of `out`, one a line (none if it does not exist yet)."""
    return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


def extrapolated_slots(record: dict) -> int:
    """The largest `max_slots` that a fitting (slots, 8192) decode record suggests would fit the chip: the
    cache and the temporaries taken to grow with the slots (the temporaries are mostly the sampling's, per
    slot), the rest of the arguments (the weights) not. Uses the chip's HBM as `plan` counts it, which is a
    little more than XLA lets a program use (31.25 of 32 GiB on a v6e)."""
    per_slot = (record["plan_kv_cache_bytes"] + record["temp_bytes"]) / record["max_slots"]
    fixed = record["argument_bytes"] - record["plan_kv_cache_bytes"]
    return max(0, int((record["hbm_bytes"] - fixed) // per_slot))


def is_search(record: dict) -> bool:
    """Whether `record` is a compile of the largest `max_slots` search (not one of the table's own cases)."""
    return (record["program"], record["max_len"]) == ("decode", LARGEST_LEN) and record["max_slots"] != BASE_SLOTS


def search_largest(model: str, packed: bool, topology: str, records: dict[tuple, dict], out: Path,
                   start: int | None = None) -> None:  # fmt: skip
    """Compiles the decode call at multiples of SLOT_STEP slots (max_len LARGEST_LEN) until a fitting count and
    the next one, which does not, are both compiled: from `start`, or else the extrapolation of the BASE_SLOTS
    call (compiled first where it is not in `records`), steps doubling up while it fits or down while it does
    not, then halving the bracket. `records` holds the results by key; each compile is appended to `out`."""

    def result(slots: int) -> bool:
        if slots <= 0:
            return True  # no slot: the bottom of the bracket, not compiled
        found = records.get((model, packed, topology, slots, LARGEST_LEN, "decode"))
        if found is None:
            found = compile_and_append(out, (model, packed, topology, slots, LARGEST_LEN), "decode")
            records[key(found)] = found
        return bool(found.get("fits"))

    base = (model, packed, topology, BASE_SLOTS, LARGEST_LEN, "decode")
    guess = start if start is not None else extrapolated_slots(records[base]) if result(BASE_SLOTS) else 0
    fits = failed = max(SLOT_STEP, guess // SLOT_STEP * SLOT_STEP)
    step = SLOT_STEP
    if result(fits):
        while result(fits + step):
            fits, step = fits + step, 2 * step
        failed = fits + step
    else:
        while not result(failed - step):
            failed, step = failed - step, 2 * step
        fits = max(0, failed - step)
    while failed - fits > SLOT_STEP:
        middle = (fits + failed) // (2 * SLOT_STEP) * SLOT_STEP
        fits, failed = (middle, failed) if result(middle) else (fits, middle)


def earlier_bound(records: list[dict], model: str, packed: bool, topology: str) -> int | None:
    """The largest `max_slots` that an earlier search compiled and found to fit, if any."""
    fitting = [r["max_slots"] for r in records if is_search(r) and r.get("fits")
               and (r["model"], r["packed"], r["topology"]) == (model, packed, topology)]  # fmt: skip
    return max(fitting, default=None)


def largest_text(records: list[dict], kind_name: str, topology: str) -> str:
    """The largest `max_slots` at LARGEST_LEN for a table row: compiled bounds (a count that fits and the count a
    step above, which does not), or a compiled count above BASE_SLOTS that fits, else the extrapolation."""
    tried = [r for r in records if (kind(r["model"], r["packed"]), r["topology"], r["max_len"], r["program"])
             == (kind_name, topology, LARGEST_LEN, "decode")]  # fmt: skip
    fitting = [r["max_slots"] for r in tried if r.get("fits")]
    over = [r["max_slots"] for r in tried if not r.get("fits") and r["max_slots"] > max(fitting, default=0)]
    if fitting and over and min(over) - max(fitting) <= SLOT_STEP:
        return f"{max(fitting):,} ({min(over):,} no)"
    if not fitting and over:
        return f"< {min(over):,}"
    if max(fitting, default=BASE_SLOTS) > BASE_SLOTS:
        return f"{max(fitting):,} or more"
    base = next((r for r in tried if r["max_slots"] == BASE_SLOTS and r.get("fits")), None)
    return f"~{extrapolated_slots(base):,} (extrapolated)" if base else "-"


def table(records: list[dict]) -> str:
    """The Markdown table of the issue's cases: the newest record of each case and program."""
    newest = {key(record): record for record in records}
    header = ("model", "topology", "mesh", "max_slots x max_len", "program", "total per chip", "HBM", "fits",
              "temporaries", "plan", "largest max_slots at 8,192", "compile")  # fmt: skip
    rule = ("---",) * 5 + ("---:", "---:", "---") + ("---:",) * 4
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    for program in ("decode", "prefill"):
        for case in cases():
            record = newest.get((*case, program))
            if record is not None:
                lines.append("| " + " | ".join(table_cells(record, list(newest.values()))) + " |")
    return "\n".join(lines)


def table_cells(record: dict, records: list[dict]) -> list[str]:
    """One table row's cells."""
    name = kind(record["model"], record["packed"]).replace("-", " ")
    mesh = ", ".join(str(size) for size in record["mesh"].values()) if "mesh" in record else "-"
    if record.get("temp_bytes") is not None:
        total = f"{record['total_bytes'] / GIB:.2f}"
        temporaries = f"{record['temp_bytes'] / MIB:,.1f} MiB"
        planned = record["plan_working_bytes"]
        plan = f"{planned / MIB:,.1f} MiB ({planned / record['temp_bytes']:.2f}x)"
    else:
        total, temporaries, plan = _needed(record.get("error", "")), "-", "-"
    headline = (record["program"], record["max_slots"], record["max_len"]) == ("decode", BASE_SLOTS, LARGEST_LEN)
    largest = largest_text(records, kind(record["model"], record["packed"]), record["topology"]) if headline else ""
    hbm = f"{record['hbm_bytes'] / GIB:.0f}" if "hbm_bytes" in record else "-"
    return [name, record["topology"], mesh, f"{record['max_slots']:,} x {record['max_len']:,}", record["program"],
            total, hbm, "yes" if record.get("fits") else "no", temporaries, plan, largest,
            f"{record['compile_s']:,.0f} s"]  # fmt: skip


def _needed(error: str) -> str:
    """What XLA's out-of-memory message says the program needs ("33.20G (XLA's message)"), or the error."""
    match = re.search(r"required for HLO temporaries \(([0-9.]+G)\)", error)
    return f"{match[1]} (XLA's message)" if match else error[:60]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--programs", default="decode,prefill")
    parser.add_argument("--replan", action="store_true", help="recompute the plan's figures in --out; no compile")
    parser.add_argument("--largest", action="store_true", help="search the largest max_slots at max_len 8192")
    parser.add_argument("--research", action="store_true",
                        help="with --largest: search again after a code change, ignoring the earlier searches' "
                             "records but starting from their largest fitting count")  # fmt: skip
    parser.add_argument("--table", action="store_true", help="print the Markdown table of --out; no compile")
    parser.add_argument("--kinds", default="", help="only these, comma-separated: 20B-bf16,120B-packed,...")
    parser.add_argument("--topologies", default="", help="only these, comma-separated")
    parser.add_argument("--settings", default="", help="only these, comma-separated SLOTSxLEN: 64x8192,...")
    args = parser.parse_args()
    jax.config.update("jax_platforms", "cpu")
    out = Path(args.out)
    if args.replan:
        replan(out)
        return
    records = read_records(out)
    if args.table:
        print(table(records))
        return
    done = {key(record): record for record in records}
    chosen = [case for case in cases() if selected(case, args.kinds, args.topologies, args.settings)]
    if args.largest:
        if args.research:
            done = {key(record): record for record in records if not is_search(record)}
        for model, packed, topology in dict.fromkeys(case[:3] for case in chosen):
            start = earlier_bound(records, model, packed, topology) if args.research else None
            search_largest(model, packed, topology, done, out, start)
        return
    for program in args.programs.split(","):
        for case in chosen:
            if (*case, program) not in done:
                compile_and_append(out, case, program)


def compile_and_append(out: Path, case: tuple[str, bool, str, int, int], program: str) -> dict:
    """Compiles one case's program and appends its record to `out` (an error is recorded, not raised)."""
    model, packed, topology_name, slots, length = case
    start = time.perf_counter()
    try:
        record = run_case(model, packed, tpu_compile.load_topology(topology_name), slots, length, program)
    except Exception as err:  # noqa: BLE001 - a case that cannot compile is recorded, and the next runs
        record = {"model": model, "packed": packed, "topology": topology_name, "max_slots": slots,
                  "max_len": length, "program": program, "error": f"{type(err).__name__}: {err}"[:500],
                  "compile_s": round(time.perf_counter() - start, 1)}  # fmt: skip
    with out.open("a") as file:  # one line per case, appended whole: a stopped run loses only its case
        file.write(json.dumps(record) + "\n")
        file.flush()
        os.fsync(file.fileno())
    print(json.dumps(record), flush=True)
    return record


if __name__ == "__main__":
    main()
