"""GPT-OSS decoding on one GPU against the bound that reading the weights sets: ours (bf16 experts and packed
MXFP4 experts) and transformers' `generate`, in one run sized for a short lease.

    python bench/gpu_decode.py --config=configs/gpt_oss_20b.py --json=$OUT/gpu_decode.json \
        --markdown=$OUT/gpu_decode.md

Check it on the CPU with small shapes first:

    python bench/gpu_decode.py --config=configs/tiny.py --batch=1,8 --packed_batch=1 --prefill_batch=8 \
        --prompt=16 --new=16 --transformers_batch=1 --bandwidth_gb=0.2 --json=/tmp/g.json --markdown=/tmp/g.md

Measurements, most important first: the card's copy bandwidth; our decoding (bf16 weights) at the first two
--batch sizes; with packed experts at each --packed_batch; our prefill of --prefill_batch prompts; bf16 at the
other --batch sizes; then, with JAX's device memory given back, transformers at each --transformers_batch.
Each decoding row runs B prompts of --prompt random tokens for --new greedy tokens (prefill time is a run
with one new token, decode time the rest) and times the prefill and decode compiles ahead of time. A
measurement that would pass --max_seconds is skipped, one that fails is recorded with its error, and the
JSON and markdown files are rewritten after each one, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import os
import time

STARTED = time.perf_counter()
# Set before jax is imported: JAX takes only the device memory it uses, so that torch can have the rest.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import dataclasses
import gc
import importlib.metadata
import json
import shlex
import statistics
import sys
import traceback
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax.extend.backend import clear_backends

from common import best_time, load_settings, machine, run_times
from decode import engine_generate, engine_run, random_prompts, transformers_generate, transformers_model
from gptoss_dist import settings as run_settings
from gptoss_dist.config import ModelConfig
from gptoss_dist.engine import Engine
from gptoss_dist.model import GptOss, random_model

DTYPE = jnp.bfloat16
MODES = {"bf16": {}, "packed": {"packed_experts": True}}  # random_model's keyword arguments for each mode
# GB per decode step from ../shared/notes/performance-anchors.md, GPT-OSS-20B: (mode, batch) -> GB
ANCHOR_GB_PER_STEP = {("bf16", 1): 7.22, ("bf16", 64): 40.7, ("packed", 1): 3.71}
# Seconds the first measurement of each kind may take (a GPU at the 20B shape); later ones are expected to
# take as long as the longest of their kind so far.
FIRST_ESTIMATE_S = {"bandwidth": 15, "decode": 90, "prefill": 30, "free": 10, "transformers": 60}
VERSIONS_OF = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "torch", "transformers")


# --------------------------------------------------------------------------------------------- the bound


def weight_bytes_per_step(cfg: ModelConfig, batch: int, packed: bool) -> float:
    """Bytes of weights one decode step of `batch` tokens must read (the KV cache ignored).

    Every non-expert parameter is read once: attention q/k/v/o with their biases and sinks, the norms, the
    routers and the unembedding; not the embedding table, of which only `batch` rows are read. Each expert
    touched in a layer reads its gate_up and down weights and biases; B tokens, each routed to k of E
    experts, touch E * (1 - (1 - k/E)^B) distinct experts per layer on average. Everything is bf16 (2 bytes
    a weight) except packed expert matrices: MXFP4, half a byte a weight and a one-byte scale per 32 weights.
    """
    hidden, heads, kv_heads, dim = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    experts, top_k, inter = cfg.num_experts, cfg.experts_per_token, cfg.intermediate_size
    attention = hidden * dim * (2 * heads + 2 * kv_heads) + dim * (heads + 2 * kv_heads) + hidden + heads
    layer = attention + 2 * hidden + hidden * experts + experts  # two norms, the router and its bias
    fixed = 2 * (cfg.num_layers * layer + hidden + hidden * cfg.vocab_size)  # the final norm, the unembedding
    expert_weights = 3 * hidden * inter  # gate_up [hidden, 2I] and down [I, hidden]
    per_weight = 0.5 + 1 / 32 if packed else 2
    per_expert = expert_weights * per_weight + 2 * (2 * inter + hidden)
    touched = experts * (1 - (1 - top_k / experts) ** batch)
    return fixed + cfg.num_layers * touched * per_expert


def bound_check() -> dict[str, float]:
    """Our bound at GPT-OSS-20B's shape over the anchors' figures, which it should match (ratios near 1)."""
    return {f"{mode} B={batch}": weight_bytes_per_step(ModelConfig(), batch, mode == "packed") / (gb * 1e9)
            for (mode, batch), gb in ANCHOR_GB_PER_STEP.items()}  # fmt: skip


def bound_figures(cfg: ModelConfig, mode: str, batch: int, decode_tok_s: float, bandwidth: float | None) -> dict:
    """The weight-bytes bound on tokens/s at the measured copy bandwidth (bytes/s), and the share reached."""
    step_bytes = weight_bytes_per_step(cfg, batch, mode == "packed")
    if bandwidth is None:
        return {"weight_bytes_per_step": step_bytes}
    bound = batch * bandwidth / step_bytes
    return {"weight_bytes_per_step": step_bytes, "bound_tok_s": bound, "fraction_of_bound": decode_tok_s / bound}


# -------------------------------------------------------------------------------------------- measuring


def copy_bandwidth(gigabytes: float, repeats: int) -> dict:
    """The device's copy bandwidth: a jitted x + 1 over `gigabytes` of bf16, bytes read and written over the
    median of `repeats` runs after a warm-up."""
    columns = 4096
    x = jnp.ones((int(gigabytes * 1e9) // (2 * columns), columns), jnp.bfloat16)
    add_one = jax.jit(lambda x: x + 1)
    times = run_times(lambda: add_one(x), repeats)
    moved = 2 * x.nbytes
    return {"bytes_moved": moved, "times_s": times, "bandwidth_bytes_s": moved / statistics.median(times)}


def device_memory() -> dict | None:
    """The first device's bytes in use and peak (None where the backend does not say, as on the CPU)."""
    stats = jax.devices()[0].memory_stats()
    return None if stats is None else {key: stats.get(key) for key in ("bytes_in_use", "peak_bytes_in_use")}


class Lazy:
    """Values by key, made by `make(key)` on first use and kept until dropped. A key whose making failed
    raises again rather than trying again (at the 20B shape a failed making costs minutes)."""

    def __init__(self, make: Callable[[str], object]):
        self.make = make
        self.made: dict[str, object] = {}
        self.errors: dict[str, str] = {}

    def get(self, key: str):
        if key in self.errors:
            raise RuntimeError(f"making {key} failed earlier: {self.errors[key]}")
        if key not in self.made:
            try:
                self.made[key] = self.make(key)
            except Exception as err:
                self.errors[key] = f"{type(err).__name__}: {err}"
                raise
        return self.made[key]

    def drop(self, key: str) -> None:
        self.made.pop(key, None)


def make_weights(cfg: ModelConfig, figures: dict[str, dict], mode: str) -> GptOss:
    """Random weights at the config's shape in `mode`; figures[mode] gets their bytes, the seconds taken and
    the device memory before and after."""
    before, start = device_memory(), time.perf_counter()
    model = random_model(cfg, dtype=DTYPE, **MODES[mode])
    leaves = jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
    figures[mode] = {"seconds": time.perf_counter() - start, "param_bytes": sum(x.nbytes for x in leaves),
                     "memory_before": before, "memory_after": device_memory()}  # fmt: skip
    return model


class CompileTimer:
    """Stands in for one of an engine's compiled steps (a `partial` of a `jax.jit` function): the first call
    lowers and compiles it ahead of time with that call's own arguments, timing both, then runs it from the
    cache that the compile filled."""

    def __init__(self, step: partial):
        self.step = step
        self.seconds: dict[str, float] | None = None

    def __call__(self, **kwargs):
        if self.seconds is None:
            start = time.perf_counter()
            lowered = self.step.func.lower(*self.step.args, **self.step.keywords, **kwargs)
            lowered_at = time.perf_counter()
            lowered.compile()
            self.seconds = {"lower_s": lowered_at - start, "compile_s": time.perf_counter() - lowered_at}
        return self.step(**kwargs)


def timed_engine(
    model: GptOss, batch: int, args: argparse.Namespace, overlap: bool = True
) -> tuple[Engine, dict[str, CompileTimer]]:
    """An engine for `batch` sequences whose prefill and decode steps time their compiles."""
    engine = Engine(model, max_slots=batch, max_len=args.prompt + args.new, steps_per_call=args.steps_per_call,
                    stop_tokens=(), prefill_tokens=args.prefill_tokens, overlap=overlap)  # fmt: skip
    timers = {"prefill": CompileTimer(engine._prefill), "decode": CompileTimer(engine._decode)}
    engine._prefill, engine._decode = timers["prefill"], timers["decode"]
    return engine, timers


def compile_figures(timers: dict[str, CompileTimer]) -> dict:
    return {f"{name}_compile": timer.seconds for name, timer in timers.items()}


def ours_decode(weights: Lazy, mode: str, batch: int, args: argparse.Namespace, overlap: bool = True) -> dict:
    model = weights.get(mode)
    engine, timers = timed_engine(model, batch, args, overlap)
    prompts = random_prompts(model.config.vocab_size, batch, args.prompt)
    return engine_generate(engine, prompts, args.new, args.repeats) | compile_figures(timers)


def ours_prefill(weights: Lazy, args: argparse.Namespace) -> dict:
    model = weights.get("bf16")
    engine, timers = timed_engine(model, args.prefill_batch, args)
    prompts = random_prompts(model.config.vocab_size, args.prefill_batch, args.prompt)
    seconds = best_time(engine_run(engine, prompts, 1), args.repeats)
    return {"prefill_tok_s": args.prefill_batch * args.prompt / seconds} | compile_figures(timers)


def free_jax() -> dict:
    """Drops every compiled program, then JAX's device client, so that torch can have the memory (the
    weights are dropped after their last use)."""
    jax.clear_caches()
    gc.collect()
    memory = device_memory()
    clear_backends()
    gc.collect()
    return {"memory_before_clearing_backends": memory}


def transformers_decode(reference: Lazy, batch: int, args: argparse.Namespace) -> dict:
    model = reference.get("transformers' model")
    return transformers_generate(model, batch, args.prompt, args.transformers_new, args.repeats)


# ------------------------------------------------------------------------------------- the run and report


@dataclasses.dataclass
class Measurement:
    name: str
    kind: str  # bandwidth, decode, prefill, free or transformers
    run: Callable[[], dict]
    labels: dict = dataclasses.field(default_factory=dict)  # impl, mode, batch: the markdown row's
    weights: str | None = None  # the JAX weights (mode) it uses


def plan(args: argparse.Namespace, weights: Lazy, reference: Lazy) -> list[Measurement]:
    """Every measurement, most important first."""
    modes = args.modes.split(",")

    def ours(mode: str, batch_flag: str) -> list[Measurement]:
        return [ours_measurement(weights, mode, b, args) for b in batches(batch_flag)] if mode in modes else []

    bf16, packed = ours("bf16", args.batch), ours("packed", args.packed_batch)
    in_turn = [in_turn_measurement(weights, b, args) for b in batches(args.in_turn_batch)] if bf16 else []
    prefill = [prefill_measurement(weights, args)] if bf16 and args.prefill_batch else []
    transformers = [transformers_measurement(reference, b, args) for b in batches(args.transformers_batch)]
    free = [Measurement("free JAX memory", "free", free_jax)] if transformers else []
    copy = partial(copy_bandwidth, args.bandwidth_gb, args.bandwidth_repeats)
    bandwidth = Measurement("copy bandwidth", "bandwidth", copy)
    return [bandwidth, *bf16[:2], *packed, *in_turn, *prefill, *bf16[2:], *free, *transformers]


def ours_measurement(weights: Lazy, mode: str, batch: int, args: argparse.Namespace) -> Measurement:
    labels = {"impl": "ours", "mode": mode, "batch": batch}
    run = partial(ours_decode, weights, mode, batch, args)
    return Measurement(f"ours {mode} B={batch}", "decode", run, labels, mode)


def in_turn_measurement(weights: Lazy, batch: int, args: argparse.Namespace) -> Measurement:
    """bf16 decoding with the host reading each call's tokens before it dispatches the next: the peer of
    the engine's overlap."""
    labels = {"impl": "ours", "mode": "bf16 (no overlap)", "batch": batch}
    run = partial(ours_decode, weights, "bf16", batch, args, overlap=False)
    return Measurement(f"ours bf16 no-overlap B={batch}", "decode", run, labels, "bf16")


def prefill_measurement(weights: Lazy, args: argparse.Namespace) -> Measurement:
    labels = {"impl": "ours", "mode": "bf16 (prefill only)", "batch": args.prefill_batch}
    run = partial(ours_prefill, weights, args)
    return Measurement(f"ours bf16 prefill B={args.prefill_batch}", "prefill", run, labels, "bf16")


def transformers_measurement(reference: Lazy, batch: int, args: argparse.Namespace) -> Measurement:
    labels = {"impl": "transformers", "mode": "bf16", "batch": batch}
    run = partial(transformers_decode, reference, batch, args)
    return Measurement(f"transformers B={batch}", "transformers", run, labels)


def batches(flag: str) -> list[int]:
    return [int(b) for b in flag.split(",") if b.strip()]


class Report:
    """Every figure so far; `write` rewrites the JSON and markdown files."""

    def __init__(self, args: argparse.Namespace, cfg: ModelConfig):
        self.args, self.cfg = args, cfg
        self.setup = {
            "command": shlex.join(["python", *sys.argv]),
            "device": jax.devices()[0].device_kind,
            "machine": machine(),
            "versions": versions(),
            "config": args.config,
            "model": dataclasses.asdict(cfg),
            "bound_check": bound_check(),
        }
        self.weights: dict[str, dict] = {}  # make_weights' figures by mode
        self.measurements: list[dict] = []

    @property
    def bandwidth(self) -> float | None:
        measured = [m for m in self.measurements if m["kind"] == "bandwidth" and m["status"] == "ok"]
        return measured[0]["bandwidth_bytes_s"] if measured else None

    def estimate_s(self, kind: str) -> float:
        return max((m["wall_s"] for m in self.measurements if m["kind"] == kind and "wall_s" in m),
                   default=FIRST_ESTIMATE_S[kind])  # fmt: skip

    def add(self, entry: dict) -> None:
        if entry["status"] == "ok" and "decode_tok_s" in entry:
            mode = "packed" if entry["mode"] == "packed" else "bf16"
            entry |= bound_figures(self.cfg, mode, entry["batch"], entry["decode_tok_s"], self.bandwidth)
        self.measurements.append(entry)
        self.write()

    def write(self) -> None:
        if self.args.json:
            data = {**self.setup, "weights": self.weights, "measurements": self.measurements}
            with open(self.args.json, "w") as f:
                json.dump(data, f, indent=2)
        if self.args.markdown:
            with open(self.args.markdown, "w") as f:
                f.write(self.markdown())

    def markdown(self) -> str:
        args, bandwidth = self.args, self.bandwidth
        copy = f"{bandwidth / 1e9:,.0f} GB/s" if bandwidth else "not measured"
        versions = ", ".join(f"{name} {v}" for name, v in self.setup["versions"].items() if v)
        lines = [
            f"- Device: {self.setup['device']} ({self.setup['machine']}); {versions}.",
            (
                f"- `{args.config}`, random bf16 weights; prompt {args.prompt} tokens, {args.new} new tokens "
                f"(transformers: {args.transformers_new}), greedy; copy bandwidth {copy} (read + written)."
            ),
            f"- Command: `{self.setup['command']}`",
            "",
            "| impl / mode | batch | decode tok/s | step ms | fraction of bound | prefill tok/s | compile s |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        lines += [table_row(m) for m in self.measurements if "impl" in m]
        lines += ["", *weight_lines(self.weights)]
        return "\n".join(lines) + "\n"


def table_row(entry: dict) -> str:
    label = f"| {entry['impl']} {entry['mode']} | {entry['batch']} |"
    if entry["status"] != "ok":
        return f"{label} {entry['status']} | | | | |"

    def number(key: str, form: str) -> str:
        return format(entry[key], form) if key in entry else "-"

    compiles = [entry.get(f"{step}_compile") for step in ("prefill", "decode")]
    compile_s = " + ".join(f"{c['lower_s'] + c['compile_s']:.1f}" if c else "-" for c in compiles)
    return (f"{label} {number('decode_tok_s', ',.0f')} | {number('step_ms', '.1f')} "
            f"| {number('fraction_of_bound', '.0%')} | {number('prefill_tok_s', ',.0f')} "
            f"| {compile_s if entry['impl'] == 'ours' else '-'} |")  # fmt: skip


def weight_lines(figures: dict[str, dict]) -> list[str]:
    """A line per mode: the weights' bytes and, where the device says, the memory they took."""
    lines = []
    for mode, f in figures.items():
        held = f"{f['param_bytes'] / 1e9:.3g} GB of parameters"
        before, after = f["memory_before"], f["memory_after"]
        if after:
            taken = (after["bytes_in_use"] - before["bytes_in_use"]) / 1e9
            peak = after["peak_bytes_in_use"] / 1e9
            held += f" ({taken:.3g} GB more device memory in use; peak so far {peak:.3g} GB)"
        lines.append(f"- {mode} weights: {held}, made in {f['seconds']:.0f} s.")
    return lines


def versions() -> dict[str, str | None]:
    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {name: version(name) for name in VERSIONS_OF}


def measure(measurement: Measurement, report: Report, budget_s: float) -> dict:
    """Runs one measurement unless it would pass the time budget; an error is recorded, not raised."""
    entry = {"name": measurement.name, "kind": measurement.kind, **measurement.labels}
    started = time.perf_counter() - STARTED
    estimate = report.estimate_s(measurement.kind)
    if started + estimate > budget_s:
        return entry | {"status": "skipped: time budget", "started_s": started, "estimate_s": estimate}
    try:
        entry |= {"status": "ok", **measurement.run()}
    except Exception as err:  # noqa: BLE001 - a failed measurement is a result, the rest still run
        entry |= {"status": f"error: {type(err).__name__}", "error": str(err), "traceback": traceback.format_exc()}
    return entry | {"started_s": started, "wall_s": time.perf_counter() - STARTED - started}


def show(entry: dict) -> None:
    figures = {k: v for k, v in entry.items() if k not in ("name", "kind", "status", "traceback", "impl", "mode")}
    print(f"[{time.perf_counter() - STARTED:4.0f} s] {entry['name']}: {entry['status']} {json.dumps(figures)}")
    if "traceback" in entry:
        print(entry["traceback"])
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/gpt_oss_20b.py", help="the model's shape (weights: bf16)")
    parser.add_argument("--modes", default="bf16,packed", help="bf16 experts and/or packed (MXFP4) experts")
    parser.add_argument(
        "--batch",
        default="1,64,8,256",
        help="bf16 batch sizes, most important first: the first two run before the packed ones",
    )
    parser.add_argument("--packed_batch", default="1,64", help="batch sizes with packed experts")
    parser.add_argument("--in_turn_batch", default="1", help="bf16 batch sizes also run without overlap")
    parser.add_argument("--prefill_batch", type=int, default=64, help="prompts in the prefill measurement (0: none)")
    parser.add_argument("--transformers_batch", default="1,8,64", help="batch sizes for transformers ('': none)")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--transformers_new", type=int, default=32)
    parser.add_argument("--steps_per_call", type=int, default=16)
    parser.add_argument("--prefill_tokens", type=int, default=16384, help="padded prompt tokens per prefill call")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs after the warm-up; the best counts")
    parser.add_argument("--bandwidth_gb", type=float, default=4.0)
    parser.add_argument("--bandwidth_repeats", type=int, default=10)
    parser.add_argument("--max_seconds", type=float, default=500, help="skip what would end past this")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()

    cfg = run_settings.model_config(load_settings(args.config))
    report = Report(args, cfg)
    weights = Lazy(partial(make_weights, cfg, report.weights))
    checks = ", ".join(f"{name} {ratio:.3f}" for name, ratio in report.setup["bound_check"].items())
    print(f"weight bytes per step at GPT-OSS-20B's shape over the anchors' (1 = agrees): {checks}")
    measurements = plan(args, weights, reference=Lazy(lambda _: transformers_model(cfg, DTYPE)))
    print("plan:", ", ".join(m.name for m in measurements), flush=True)
    for index, measurement in enumerate(measurements):
        entry = measure(measurement, report, args.max_seconds)
        if measurement.weights and all(later.weights != measurement.weights for later in measurements[index + 1 :]):
            weights.drop(measurement.weights)
        report.add(entry)
        show(entry)
    print(report.markdown(), flush=True)


if __name__ == "__main__":
    main()
