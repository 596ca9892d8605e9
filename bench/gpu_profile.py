"""Where a decode step's time goes: the engine's decoding traced with JAX's profiler, the device's activity
summed line by line (on a GPU, each stream's kernels) and by kernel name, per decode step.

    python bench/gpu_profile.py --config=configs/gpt_oss_20b.py --batch=1 --modes=bf16,packed \
        --json=$OUT/gpu_profile.json

Random weights of the config's shape. Each mode runs B prompts of --prompt tokens for --calls decode calls
of --steps_per_call steps once to compile, then again under the profiler. Per line: events, busy time (the
sum of event durations), the span from the first event's start to the last one's end, and the names that
take the most time. Busy time over the span is how much of the time the device worked; the rest is waiting
on the host, launches and gaps between kernels.
"""

from __future__ import annotations

import argparse
import glob
import json
import tempfile
from collections import Counter

import jax
import jax.numpy as jnp
from jax.profiler import ProfileData

from common import load_settings, machine
from decode import engine_run, random_prompts
from gptoss_dist import settings as run_settings
from gptoss_dist.engine import Engine
from gptoss_dist.model import random_model

MODES = {"bf16": {}, "packed": {"packed_experts": True}}


def summarize(trace_dir: str, steps: int, top: int) -> list[dict]:
    """Each device line's events in the trace under `trace_dir`, per decode step (`steps` traced)."""
    [path] = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    lines = []
    for plane in ProfileData.from_file(path).planes:
        if not plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            events = [(event.name, event.start_ns, event.duration_ns) for event in line.events]
            if not events:
                continue
            by_name: Counter[str] = Counter()
            for name, _, duration in events:
                by_name[name] += duration
            busy = sum(duration for _, _, duration in events)
            span = max(start + duration for _, start, duration in events) - min(start for _, start, _ in events)
            lines.append({
                "plane": plane.name, "line": line.name, "events_per_step": len(events) / steps,
                "busy_us_per_step": busy / steps / 1e3, "span_us_per_step": span / steps / 1e3,
                "top_us_per_step": {name: ns / steps / 1e3 for name, ns in by_name.most_common(top)},
            })  # fmt: skip
    return lines


def profile_mode(cfg, mode: str, args: argparse.Namespace) -> dict:
    model = random_model(cfg, dtype=jnp.bfloat16, **MODES[mode])
    steps = args.steps_per_call * args.calls
    engine = Engine(model, max_slots=args.batch, max_len=args.prompt + steps + 1, steps_per_call=args.steps_per_call,
                    stop_tokens=())  # fmt: skip
    run = engine_run(engine, random_prompts(cfg.vocab_size, args.batch, args.prompt), steps + 1)
    run()  # compiles
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            run()
        return {"mode": mode, "batch": args.batch, "decode_steps": steps, "lines": summarize(trace_dir, steps, args.top)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/gpt_oss_20b.py")
    parser.add_argument("--modes", default="bf16,packed")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=16, help="short: the prefill is traced too")
    parser.add_argument("--steps_per_call", type=int, default=16)
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--top", type=int, default=25, help="names kept per line")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cfg = run_settings.model_config(load_settings(args.config))
    profiles = []
    for mode in args.modes.split(","):
        profiles.append(profile_mode(cfg, mode, args))
        for line in profiles[-1]["lines"]:
            print(f"{mode} B={args.batch} {line['plane']} {line['line']}: {line['events_per_step']:.0f} events, "
                  f"busy {line['busy_us_per_step']:,.0f} us of {line['span_us_per_step']:,.0f} us a step", flush=True)
        if args.json:  # rewritten after each mode, so that a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"machine": machine(), "config": args.config, "profiles": profiles}, f, indent=2)


if __name__ == "__main__":
    main()
