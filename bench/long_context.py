"""Long prompts on the CPU: prefill time and peak memory against prompt length, and how long decoding stalls
while a long prompt is prefilled among short requests.

    python bench/long_context.py --config=configs/tiny.py --lengths=2048,8192,16384,32768 --transformers_upto=8192

Prefill: one prompt of each length, one new token, in pieces of --prefill_tokens, each length in its own process
(peak RSS is that process's high-water mark); the time is the second run's, after a compiling one. The peer is
transformers' GptOssForCausalLM on the same shape (random weights, eager attention, which builds the whole
[heads, T, T] score matrix), up to --transformers_upto tokens.

Stall: --short requests of 16 tokens (64 new each) on 8 slots, with one --long-token prompt among them; the
longest wall-clock gap between two decode calls' tokens, with the long prompt in pieces of --prefill_tokens and
in one piece (the peer).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np

from common import load_settings, machine
from gptoss_dist import settings as run_settings
from gptoss_dist.engine import Engine, Request
from gptoss_dist.model import random_model


def long_config(config_path: str):
    return run_settings.model_config(load_settings(config_path))


def prompt(cfg, length: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, length).tolist()


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def prefill_ours(config_path: str, length: int, prefill_tokens: int) -> dict:
    cfg = long_config(config_path)
    model = random_model(cfg, dtype=jnp.float32)
    engine = Engine(model, max_slots=1, max_len=length + 64, prefill_tokens=prefill_tokens)
    request = Request(prompt(cfg, length), max_new_tokens=1)
    engine.generate([request])  # compiles
    start = time.perf_counter()
    engine.generate([request])
    return {"seconds": time.perf_counter() - start, "peak_rss_gb": peak_rss_gb()}


def prefill_transformers(config_path: str, length: int) -> dict:
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    hf = long_config(config_path).to_hf_dict()
    model = GptOssForCausalLM(GptOssConfig(**hf, attn_implementation="eager")).eval()
    ids = torch.tensor([prompt(long_config(config_path), length)])
    with torch.no_grad():
        model(ids[:, :16])
        start = time.perf_counter()
        model(ids)
    return {"seconds": time.perf_counter() - start, "peak_rss_gb": peak_rss_gb()}


def decode_stall(config_path: str, short: int, long: int, prefill_tokens: int) -> dict:
    """The longest gap between two decode calls' updates while `long` prefills among `short` requests."""
    cfg = long_config(config_path)
    model = random_model(cfg, dtype=jnp.float32)
    requests = [Request(prompt(cfg, 16, seed=i), max_new_tokens=64, id=i) for i in range(short)]
    requests.insert(4, Request(prompt(cfg, long, seed=99), max_new_tokens=8, id="long"))
    engine = Engine(model, max_slots=8, max_len=long + 64, steps_per_call=4, prefill_tokens=prefill_tokens)
    engine.generate(requests)  # compiles every shape
    decode_times, start = [], time.perf_counter()
    for update in engine.stream(requests):
        if update.request.id != "long" and len(update.tokens) > 1:  # a decode call's tokens
            now = time.perf_counter()
            if not decode_times or now - decode_times[-1] > 1e-3:
                decode_times.append(now)
    gaps = np.diff(decode_times)
    return {"longest_gap_s": float(gaps.max()), "median_gap_s": float(np.median(gaps)),
            "total_s": time.perf_counter() - start, "prefill_calls": sum(engine.prefill_shapes.values())}  # fmt: skip


def in_subprocess(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--lengths", default="2048,8192,16384,32768")
    parser.add_argument("--prefill_tokens", type=int, default=512)
    parser.add_argument("--transformers_upto", type=int, default=8192)
    parser.add_argument("--short", type=int, default=40)
    parser.add_argument("--long", type=int, default=8192)
    parser.add_argument("--one", default="", help="(internal) one measurement in this process: KIND:LENGTH:TOKENS")
    args = parser.parse_args()
    if args.one:
        kind, length, tokens = args.one.split(":")
        if kind == "ours":
            figures = prefill_ours(args.config, int(length), int(tokens))
        elif kind == "transformers":
            figures = prefill_transformers(args.config, int(length))
        else:
            figures = decode_stall(args.config, args.short, int(length), int(tokens))
        print(json.dumps(figures))
        return
    print(json.dumps({"machine": machine(), "config": args.config}))
    for length in map(int, args.lengths.split(",")):
        row = {"length": length, "ours": in_subprocess(["--config", args.config, "--one",
                                                        f"ours:{length}:{args.prefill_tokens}"])}  # fmt: skip
        if length <= args.transformers_upto:
            row["transformers"] = in_subprocess(["--config", args.config, "--one", f"transformers:{length}:0"])
        print(json.dumps(row), flush=True)
    for tokens in (args.prefill_tokens, args.long):
        stall = in_subprocess(["--config", args.config, "--short", str(args.short), "--one",
                               f"stall:{args.long}:{tokens}"])  # fmt: skip
        print(json.dumps({"stall": {"long": args.long, "prefill_tokens": tokens, **stall}}), flush=True)


if __name__ == "__main__":
    main()
