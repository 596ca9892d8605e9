"""What XLA's temporaries are made of: one of the job's programs compiled for a TPU topology (as
`gptoss_dist.compile` does), XLA's buffer assignment dumped, and the largest buffers of its HBM temporaries
listed with their shapes, beside the plan's working memory for that program.

    python bench/compile_buffers.py --config=configs/gpt_oss_20b.py --topology=v6e:2x4 --mesh=1,8,1 \
        --layers=2 --program=decode --set=max_slots=64,max_len=8192 [--packed]

`--layers=2` keeps a sliding and a full-attention layer of the model's widths (minutes to compile, not tens
of minutes); 0 keeps the config's layers. Buffers that share an offset are live at different times: the
allocation's size is the peak. XLA's `temp_bytes` can exceed the allocation (by 1% on decode, 6% on a
20B prefill, 40% on a 120B packed prefill at 2 layers): what the rest is, the dump does not say.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from pathlib import Path

import jax
from common import load_settings

from gptoss_dist import compile as tpu_compile
from gptoss_dist.config import FULL, SLIDING

MiB = 1 << 20
# `allocation 7: size 123, preallocated-temp:` (HBM: no color), then its values, one a line
_ALLOCATION = re.compile(r"^allocation \d+: size (\d+), preallocated-temp:\n((?: value: .*\n)*)", re.MULTILINE)
_VALUE = re.compile(r"value: <\d+ (\S+) @0> \(size=(\d+),offset=(\d+)\): (\S+)")


def largest_temporaries(dump: Path, count: int) -> tuple[int, list[tuple[str, int, int, str]]]:
    """The HBM temporary allocation's size in a dump, and its `count` largest values (name, bytes, offset,
    shape)."""
    text = next(dump.glob("*after_optimizations-buffer-assignment.txt")).read_text()
    size, values = max(((int(m[1]), m[2]) for m in _ALLOCATION.finditer(text)), default=(0, ""))
    found = [(name, int(nbytes), int(offset), shape) for name, nbytes, offset, shape in _VALUE.findall(values)]
    return size, sorted(found, key=lambda value: -value[1])[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--topology", required=True)
    parser.add_argument("--mesh", required=True, help="data,tensor,expert")
    parser.add_argument("--program", choices=("decode", "prefill"), required=True)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--packed", action="store_true")
    parser.add_argument("--set", default="", help="settings, name=value,...")
    parser.add_argument("--count", type=int, default=12)
    args = parser.parse_args()
    overrides = {"packed_experts": args.packed}
    overrides.update(item.split("=") for item in filter(None, args.set.split(",")))
    overrides = {name: int(value) if str(value).isdigit() else value for name, value in overrides.items()}
    if args.layers:
        overrides.update({"model.num_layers": args.layers, "model.layer_types": (SLIDING, FULL) * (args.layers // 2)})
    config = load_settings(args.config, overrides)
    config.mesh.update(dict(zip(("data", "tensor", "expert"), map(int, args.mesh.split(",")))))
    dump = Path(tempfile.mkdtemp(prefix="compile_buffers-"))
    # libtpu reads XLA_FLAGS as it loads, which the first topology does
    os.environ["XLA_FLAGS"] = f"--xla_dump_to={dump} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*{args.program}"
    jax.config.update("jax_platforms", "cpu")
    topology = tpu_compile.load_topology(args.topology)
    engine = tpu_compile.abstract_engine(config, topology)
    programs = tpu_compile.job_programs(engine, all_buckets=False)
    name, lower = next(item for item in programs.items() if item[0].startswith(args.program))
    program = tpu_compile.compile_program(name, lower, topology.hbm_bytes)
    planned = tpu_compile.planned_working(tpu_compile.plan_for(config, engine, topology.chip), name)
    allocation, values = largest_temporaries(dump, args.count)
    print(json.dumps({"program": name, "topology": args.topology, "mesh": args.mesh, "layers": args.layers,
                      "temp_bytes": program.temp_bytes, "allocation_bytes": allocation, "plan_working_bytes": planned,
                      "compile_s": program.compile_s, "error": program.error}))  # fmt: skip
    for value_name, nbytes, offset, shape in values:
        print(f"{nbytes / MiB:9.2f} MiB at {offset / MiB:9.2f}  {value_name:<36} {shape}")


if __name__ == "__main__":
    main()
