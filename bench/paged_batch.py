"""Whole batches through the engine on the CPU, each beside its peer in the same run:

- `lengths`: requests of random prompt and output lengths (uniform in --prompt_range and up to --max_output,
  every output run to its length: no stop tokens), for the paged cache (pages of --page_size, a pool the size
  of the default cache) beside the default cache (a page of max_len per slot), at each --concurrency.
- `prefix`: --requests requests of one common system prompt of --system tokens and a random question of up to
  --question tokens, --output tokens each, with prefix caching on beside off (same pages).

    python bench/paged_batch.py lengths --config=configs/tiny.py
    python bench/paged_batch.py prefix --config=configs/tiny.py

At the issue's sizes (prompts of 128-2048 tokens, outputs up to 2048, max_len 8192, 64 and 256 sequences;
1,000 requests of a 1,024-token system prompt):

    python bench/paged_batch.py lengths --config=configs/tiny.py --max_len=8192 --prompt_range=128,2049 \
        --max_output=2048 --concurrency=64,256 --warmup=8
    python bench/paged_batch.py prefix --config=configs/tiny.py --requests=1000 --warmup=64

Each row: the batch's wall time and process CPU time (all threads; other processes' load on the cores disturbs
it less), generated tokens per wall second, the prompt tokens that prefill calls ran and the preemptions; after
a run of the same engine on the first --warmup requests that compiles (all of them by default; with fewer, a
prefill shape that run did not meet compiles in the timed run: `new_prefill_shapes` counts them), and whether
the tokens equal those of the first engine of the pair (greedy).
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


def timed(engine: Engine, requests: list[Request], warmup: int) -> tuple[dict, list[list[int]]]:
    engine.generate(requests[: warmup or len(requests)])  # compiles
    compiled = set(engine.prefill_shapes)
    engine.prefilled_tokens = engine.preemptions = 0
    wall, cpu = time.perf_counter(), time.process_time()
    results = engine.generate(requests)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    generated = sum(len(result.tokens) for result in results)
    row = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "tok_per_s": round(generated / wall, 1),
           "generated": generated, "prefilled": engine.prefilled_tokens, "preemptions": engine.preemptions,
           "new_prefill_shapes": len(set(engine.prefill_shapes) - compiled)}  # fmt: skip
    return row, [result.tokens for result in results]


def compare(name: str, engines: dict[str, Engine], requests: list[Request], warmup: int, **fields) -> None:
    """One row per engine; `same_tokens`: whether its tokens equal the first engine's."""
    first = None
    for label, engine in engines.items():
        row, tokens = timed(engine, requests, warmup)
        first = first or tokens
        print(json.dumps({"bench": name, "engine": label, **fields, **row, "same_tokens": tokens == first}), flush=True)


def lengths(model, args, rng) -> None:
    vocab = model.config.vocab_size
    for concurrency in map(int, args.concurrency.split(",")):
        requests = [Request(rng.integers(0, vocab, rng.integers(*args.prompt_range)).tolist(),
                            max_new_tokens=int(rng.integers(1, args.max_output + 1)))
                    for _ in range(args.requests or 2 * concurrency)]  # fmt: skip
        common = {"max_slots": concurrency, "max_len": args.max_len, "stop_tokens": (),
                  "prefill_tokens": args.prefill_tokens}  # fmt: skip
        engines = {"paged": Engine(model, page_size=args.page_size, **common), "default": Engine(model, **common)}
        compare("lengths", engines, requests, args.warmup, concurrency=concurrency, max_len=args.max_len,
                n_requests=len(requests))  # fmt: skip


def prefix(model, args, rng) -> None:
    vocab = model.config.vocab_size
    system = rng.integers(0, vocab, args.system).tolist()
    requests = [Request(system + rng.integers(0, vocab, rng.integers(1, args.question + 1)).tolist(),
                        max_new_tokens=args.output) for _ in range(args.requests or 64)]  # fmt: skip
    common = {"max_slots": args.slots, "max_len": args.max_len, "stop_tokens": (), "page_size": args.page_size,
              "prefill_tokens": args.prefill_tokens}  # fmt: skip
    engines = {"cached": Engine(model, prefix_caching=True, **common), "uncached": Engine(model, **common)}
    compare("prefix", engines, requests, args.warmup, system=args.system, slots=args.slots, n_requests=len(requests))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", choices=["lengths", "prefix"])
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--set", action="append", default=[], help="a setting of the config: name=integer")
    parser.add_argument("--max_len", type=int, default=2048)
    parser.add_argument("--page_size", type=int, default=64)
    parser.add_argument("--prefill_tokens", type=int, default=2048)
    parser.add_argument("--requests", type=int, default=0, help="0: twice the concurrency (lengths), 64 (prefix)")
    parser.add_argument("--warmup", type=int, default=0,
                        help="requests of the run that compiles, from the first (0: all of them)")
    parser.add_argument("--concurrency", default="8,32", help="lengths: slots")
    parser.add_argument("--prompt_range", default="32,512", help="lengths: prompt lengths, low,high")
    parser.add_argument("--max_output", type=int, default=512, help="lengths: the longest output")
    parser.add_argument("--system", type=int, default=1024, help="prefix: tokens of the common system prompt")
    parser.add_argument("--question", type=int, default=64, help="prefix: the longest question")
    parser.add_argument("--output", type=int, default=8, help="prefix: tokens generated per request")
    parser.add_argument("--slots", type=int, default=16, help="prefix: slots")
    args = parser.parse_args()
    args.prompt_range = tuple(map(int, args.prompt_range.split(",")))
    overrides = {name: int(value) for name, value in (item.split("=") for item in args.set)}
    cfg = run_settings.model_config(load_settings(args.config, overrides))
    model = random_model(cfg, dtype=jnp.float32)
    print(f"# {machine()}; {cfg.num_layers} layers, {cfg.num_heads} heads of {cfg.head_dim}, "
          f"vocabulary {cfg.vocab_size}; {vars(args)}")  # fmt: skip
    {"lengths": lengths, "prefix": prefix}[args.bench](model, args, np.random.default_rng(0))


if __name__ == "__main__":
    main()
