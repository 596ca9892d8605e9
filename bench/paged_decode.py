"""Decode step time on the CPU: against `max_len` at a fixed live length, and against the live length at a
fixed `max_len`, for the paged cache and, in the same run, the default cache (a page of max_len per slot).

    python bench/paged_decode.py --config=configs/tiny.py --set model.num_heads=64 --set model.num_kv_heads=8 \
        --set model.head_dim=64 --slots=2

(--set gives the tiny model GPT-OSS's attention shape, so that attention shows beside the rest of a step.)

A decode call's time is the median gap between the updates of consecutive decode calls (--calls of them, each
of --steps_per_call steps) while --slots prompts of the live length decode together, greedy, after a run that
compiles, and the median process CPU time (all threads) between them, which other processes' load on the
cores disturbs less than the wall time does. The paged pool holds what the batch needs (rounded up to pages)
plus one max_len sequence; the default cache holds slots x max_len.
"""

from __future__ import annotations

import argparse
import json
import time

import jax.numpy as jnp
import numpy as np

from common import load_settings, machine
from gptoss_dist import settings as run_settings
from gptoss_dist.engine import Engine, Request
from gptoss_dist.model import random_model


def requests(cfg, slots: int, live: int, new: int) -> list[Request]:
    rng = np.random.default_rng(0)
    return [Request(rng.integers(0, cfg.vocab_size, live).tolist(), max_new_tokens=new) for _ in range(slots)]


def decode_call_ms(model, args, max_len: int, live: int, page_size: int) -> tuple[float, float]:
    steps = args.steps_per_call
    need = live + 1 + steps * args.calls
    kv_pages = args.slots * -(-need // page_size) + max_len // page_size if page_size else 0
    engine = Engine(model, max_slots=args.slots, max_len=max_len, steps_per_call=steps, page_size=page_size,
                    kv_pages=kv_pages, prefill_tokens=4096, stop_tokens=())  # fmt: skip
    batch = requests(model.config, args.slots, live, 1 + steps * args.calls)
    engine.generate(batch)  # compiles
    arrivals = [(time.perf_counter(), time.process_time()) for update in engine.stream(batch)
                if update.request is batch[0]]  # fmt: skip
    wall, cpu = np.median(np.diff(np.array(arrivals[1:]), axis=0), axis=0)  # the first arrival is the prefill's
    return round(1000 * float(wall), 2), round(1000 * float(cpu), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--set", action="append", default=[], help="a setting of the config: name=integer")
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--page_size", type=int, default=128)
    parser.add_argument("--steps_per_call", type=int, default=8)
    parser.add_argument("--calls", type=int, default=12)
    parser.add_argument("--live", type=int, default=256, help="live length of the max_len sweep")
    parser.add_argument("--max_lens", default="1024,4096,16384,65536")
    parser.add_argument("--max_len", type=int, default=8192, help="max_len of the live-length sweep")
    parser.add_argument("--lives", default="128,512,2048,4096")
    args = parser.parse_args()
    overrides = {name: int(value) for name, value in (item.split("=") for item in args.set)}
    cfg = run_settings.model_config(load_settings(args.config, overrides))
    model = random_model(cfg, dtype=jnp.float32)
    print(f"# {machine()}; {cfg.num_layers} layers, {cfg.num_heads} heads of {cfg.head_dim}, {args.slots} slots, "
          f"steps_per_call {args.steps_per_call}, page_size {args.page_size}")
    sweeps = [("max_len", int(m), args.live) for m in args.max_lens.split(",")]
    sweeps += [("live", args.max_len, int(n)) for n in args.lives.split(",")]
    for sweep, max_len, live in sweeps:
        row = {"sweep": sweep, "max_len": max_len, "live": live}
        for name, page_size in (("paged", args.page_size), ("default", 0)):
            row[f"{name}_ms"], row[f"{name}_cpu_ms"] = decode_call_ms(model, args, max_len, live, page_size)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
