"""Whole batches through the engine, each beside its peer in the same run:

- `lengths`: requests of random prompt and output lengths (uniform in --prompt_range and up to --max_output,
  every output run to its length: no stop tokens), for the paged cache (pages of --page_size, a pool the size
  of the default cache) beside the default cache (a page of max_len per slot), at each --concurrency. With
  --pool_slots, a third engine: paged, with a pool of only that many max_len sequences' pages, so that more
  sequences share less memory (preempting when it runs short). With --capped_output, a last row: the paged
  engine on the first `concurrency` requests, their outputs cut to that many tokens (the peer's size, below).
- `prefix`: --requests requests of one common system prompt of --system tokens and a random question of up to
  --question tokens, --output tokens each, with prefix caching on beside off (same pages).
- `transformers`: the peer, in a process of its own (so that JAX's device memory is not held): transformers'
  `generate` (eager attention, static batches of --peer_batch, prompts padded on the left) on `lengths`'s
  first `concurrency` requests of each --concurrency, outputs cut to --capped_output. A static batch runs
  until its longest output ends; tok/s counts only the tokens the requests asked for.

    python bench/paged_batch.py lengths --config=configs/tiny.py
    python bench/paged_batch.py prefix --config=configs/tiny.py

At the issue's sizes (prompts of 128-2048 tokens, outputs up to 2048, max_len 8192, 64 and 256 sequences;
1,000 requests of a 1,024-token system prompt):

    python bench/paged_batch.py lengths --config=configs/tiny.py --max_len=8192 --prompt_range=128,2049 \
        --max_output=2048 --concurrency=64,256 --warmup=8
    python bench/paged_batch.py prefix --config=configs/tiny.py --requests=1000 --warmup=64

On a GPU at the 20B shape, with the peer: `bash bench/gpu_paged.sh OUT_DIR`.

Each row: the batch's wall time and process CPU time (all threads; other processes' load on the cores disturbs
it less), generated tokens per wall second, the prompt tokens that prefill calls ran and the preemptions; after
a run of the same engine on the first --warmup requests that compiles (all of them by default; outputs cut to
--warmup_output tokens if given; a prefill shape that run did not meet compiles in the timed run:
`new_prefill_shapes` counts them), and whether the tokens equal those of the first engine of the pair (greedy;
in bfloat16 a different cache layout may round differently, so a mismatch there is not an error by itself).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax.numpy as jnp
import numpy as np

from common import load_settings, machine
from decode import transformers_model
from gptoss_dist import settings as run_settings
from gptoss_dist.config import ModelConfig
from gptoss_dist.engine import Engine, Request
from gptoss_dist.model import EXPERTS_IMPLEMENTATIONS, random_model

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def capped(requests: list[Request], tokens: int) -> list[Request]:
    """`requests` with their outputs cut to at most `tokens`."""
    return [dataclasses.replace(r, max_new_tokens=min(r.max_new_tokens, tokens)) for r in requests]


def timed(engine: Engine, requests: list[Request], warmup: int, warmup_output: int) -> tuple[dict, list[list[int]]]:
    warm = requests[: warmup or len(requests)]
    engine.generate(capped(warm, warmup_output) if warmup_output else warm)  # compiles
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


class Rows:
    """Prints each row as a JSON line, and appends it to --json's file if given."""

    def __init__(self, path: str, header: dict):
        self.path = path
        self.header = header

    def write(self, row: dict) -> None:
        line = json.dumps({**row, **self.header})
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as out:
                out.write(line + "\n")


def compare(rows: Rows, name: str, engines: dict[str, Engine], requests: list[Request], args, **fields) -> None:
    """One row per engine; `same_tokens`: whether its tokens equal the first engine's."""
    first = None
    for label, engine in engines.items():
        row, tokens = timed(engine, requests, args.warmup, args.warmup_output)
        first = first or tokens
        rows.write({"bench": name, "engine": label, **fields, **row, "same_tokens": tokens == first})


def lengths_requests(vocab: int, concurrency: int, args) -> list[Request]:
    """The `lengths` requests at one concurrency: the same for every run and process of the same arguments."""
    rng = np.random.default_rng(concurrency)
    return [Request(rng.integers(0, vocab, rng.integers(*args.prompt_range)).tolist(),
                    max_new_tokens=int(rng.integers(1, args.max_output + 1)))
            for _ in range(args.waves * concurrency)]  # fmt: skip


def lengths(rows: Rows, model, args) -> None:
    for concurrency in args.concurrency:
        requests = lengths_requests(model.config.vocab_size, concurrency, args)
        common = {"max_slots": concurrency, "max_len": args.max_len, "stop_tokens": (),
                  "prefill_tokens": args.prefill_tokens}  # fmt: skip
        engines = {"paged": Engine(model, page_size=args.page_size, **common), "default": Engine(model, **common)}
        if args.pool_slots:
            pages = args.pool_slots * args.max_len // args.page_size
            engines[f"paged, pool of {args.pool_slots} sequences"] = Engine(
                model, page_size=args.page_size, kv_pages=pages, **common)  # fmt: skip
        fields = {"concurrency": concurrency, "max_len": args.max_len}
        compare(rows, "lengths", engines, requests, args, **fields, n_requests=len(requests))
        if args.capped_output:
            row, _ = timed(engines["paged"], capped(requests[:concurrency], args.capped_output), 0, 0)
            rows.write({"bench": "lengths", "engine": f"paged, outputs cut to {args.capped_output}", **fields,
                        "n_requests": concurrency, **row})  # fmt: skip


def prefix(rows: Rows, model, args) -> None:
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    system = rng.integers(0, vocab, args.system).tolist()
    requests = [Request(system + rng.integers(0, vocab, rng.integers(1, args.question + 1)).tolist(),
                        max_new_tokens=args.output) for _ in range(args.requests)]  # fmt: skip
    common = {"max_slots": args.slots, "max_len": args.max_len, "stop_tokens": (), "page_size": args.page_size,
              "prefill_tokens": args.prefill_tokens}  # fmt: skip
    engines = {"cached": Engine(model, prefix_caching=True, **common), "uncached": Engine(model, **common)}
    compare(rows, "prefix", engines, requests, args, system=args.system, slots=args.slots, n_requests=len(requests))


def transformers_peer(rows: Rows, cfg: ModelConfig, args) -> None:
    """transformers' `generate` on the capped `lengths` requests (see the module's docstring)."""
    import torch

    model = transformers_model(cfg, DTYPES[args.dtype])
    for concurrency in args.concurrency:
        requests = capped(lengths_requests(cfg.vocab_size, concurrency, args)[:concurrency], args.capped_output)
        batches = [requests[i : i + args.peer_batch] for i in range(0, len(requests), args.peer_batch)]
        generate_batch(model, batches[0][:1])  # warms up
        wall = time.perf_counter()
        positions = sum(generate_batch(model, batch) for batch in batches)
        wall = time.perf_counter() - wall
        asked = sum(r.max_new_tokens for r in requests)
        rows.write({"bench": "lengths", "engine": f"transformers, batches of {args.peer_batch}",
                    "concurrency": concurrency, "max_len": args.max_len, "n_requests": len(requests),
                    "wall_s": round(wall, 2), "tok_per_s": round(asked / wall, 1), "generated": asked,
                    "generated_positions": positions, "torch": torch.__version__})  # fmt: skip


def generate_batch(model, requests: list[Request]) -> int:
    """Greedy generation of one static batch (left-padded), to its longest output; the positions generated."""
    import torch

    width = max(len(r.prompt) for r in requests)
    ids = torch.zeros((len(requests), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, request in enumerate(requests):
        ids[row, width - len(request.prompt) :] = torch.tensor(request.prompt)
        mask[row, width - len(request.prompt) :] = 1
    new = max(r.max_new_tokens for r in requests)
    with torch.no_grad():
        model.generate(ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=new,
                       min_new_tokens=new, do_sample=False, pad_token_id=0)  # fmt: skip
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return len(requests) * new


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", help="comma-separated, run in turn: lengths, prefix or transformers")
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--set", action="append", default=[], help="a setting of the config: name=integer")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--experts", choices=EXPERTS_IMPLEMENTATIONS, default="auto", help="experts_implementation")
    parser.add_argument("--json", default="", help="also append each row to this file")
    parser.add_argument("--max_len", type=int, default=2048)
    parser.add_argument("--page_size", type=int, default=64)
    parser.add_argument("--prefill_tokens", type=int, default=2048)
    parser.add_argument("--requests", type=int, default=64, help="prefix: requests")
    parser.add_argument("--waves", type=int, default=2, help="lengths: requests = waves x concurrency")
    parser.add_argument("--warmup", type=int, default=0,
                        help="requests of the run that compiles, from the first (0: all of them)")
    parser.add_argument("--warmup_output", type=int, default=0,
                        help="the compiling run's outputs cut to this many tokens (0: as asked)")
    parser.add_argument("--concurrency", default="8,32", help="lengths, transformers: slots")
    parser.add_argument("--prompt_range", default="32,512", help="lengths: prompt lengths, low,high")
    parser.add_argument("--max_output", type=int, default=512, help="lengths: the longest output")
    parser.add_argument("--pool_slots", type=int, default=0, help="lengths: also a pool of this many sequences")
    parser.add_argument("--capped_output", type=int, default=0, help="lengths, transformers: see above")
    parser.add_argument("--peer_batch", type=int, default=16, help="transformers: the static batch")
    parser.add_argument("--system", type=int, default=1024, help="prefix: tokens of the common system prompt")
    parser.add_argument("--question", type=int, default=64, help="prefix: the longest question")
    parser.add_argument("--output", type=int, default=8, help="prefix: tokens generated per request")
    parser.add_argument("--slots", type=int, default=16, help="prefix: slots")
    args = parser.parse_args()
    args.prompt_range = tuple(map(int, args.prompt_range.split(",")))
    args.concurrency = list(map(int, args.concurrency.split(",")))
    overrides = {name: int(value) for name, value in (item.split("=") for item in args.set)}
    cfg = run_settings.model_config(load_settings(args.config, overrides))
    rows = Rows(args.json, {"machine": machine(), "config": args.config, "dtype": args.dtype, "experts": args.experts})
    print(f"# {machine()}; {cfg.num_layers} layers, {cfg.num_heads} heads of {cfg.head_dim}, "
          f"vocabulary {cfg.vocab_size}; {vars(args)}", flush=True)  # fmt: skip
    benches = args.bench.split(",")
    if "transformers" in benches:
        transformers_peer(rows, cfg, args)
    model = None
    for bench in (b for b in benches if b != "transformers"):
        model = model or random_model(cfg, dtype=DTYPES[args.dtype], experts_implementation=args.experts)
        {"lengths": lengths, "prefix": prefix}[bench](rows, model, args)


if __name__ == "__main__":
    main()
