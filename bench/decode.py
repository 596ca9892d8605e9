"""Decode throughput by batch size: ours (the engine) and transformers' `generate`, in the same run.

    python bench/decode.py --config=configs/tiny.py --batch=1,8,32
    python bench/decode.py --config=configs/mid.py --batch=1,8 --transformers_batch=1,8
    python bench/decode.py --config=configs/gpt_oss_20b.py --batch=1,8,64,256 --json=out.json   # on a GPU

Random weights of the config's shape. Each batch runs B prompts of --prompt tokens for --new greedy tokens;
prefill time is a run with one new token, decode time the rest. transformers runs on the same weights'
shape (random too), eager attention, in the config's dtype.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from common import best_time, load_settings, machine
from gptoss_dist import settings as run_settings
from gptoss_dist.engine import Engine, Request
from gptoss_dist.model import random_model


def ours(cfg, dtype, batch: int, prompt: int, new: int, steps_per_call: int) -> dict:
    model = random_model(cfg, dtype=dtype)
    engine = Engine(model, max_slots=batch, max_len=prompt + new, steps_per_call=steps_per_call, stop_tokens=())
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, prompt).tolist() for _ in range(batch)]

    def run(tokens: int):
        return lambda: engine.generate([Request(p, max_new_tokens=tokens) for p in prompts])

    start = time.perf_counter()
    run(new)()
    first_run = time.perf_counter() - start  # compiles prefill and the decode step
    prefill = best_time(run(1))
    total = best_time(run(new))
    return {"prefill_tok_s": batch * prompt / prefill, "decode_tok_s": batch * (new - 1) / (total - prefill),
            "step_ms": (total - prefill) / (new - 1) * 1e3, "first_run_s": first_run}  # fmt: skip


def transformers_generate(cfg, dtype, batch: int, prompt: int, new: int) -> dict:
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    torch_dtype = {jnp.bfloat16: torch.bfloat16, jnp.float32: torch.float32}[dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_config = GptOssConfig(**cfg.to_hf_dict())
    with torch.device(device):
        model = GptOssForCausalLM(hf_config).to(torch_dtype).eval()
    model.config._attn_implementation = "eager"
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt), device=device)

    def run(tokens: int):
        def generate():
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                               min_new_tokens=tokens, do_sample=False)  # fmt: skip
            if device == "cuda":
                torch.cuda.synchronize()

        return generate

    prefill, total = best_time(run(1)), best_time(run(new))
    return {"prefill_tok_s": batch * prompt / prefill, "decode_tok_s": batch * (new - 1) / (total - prefill),
            "step_ms": (total - prefill) / (new - 1) * 1e3}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes for ours")
    parser.add_argument("--transformers_batch", default=None, help="batch sizes for transformers (default: --batch)")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--steps_per_call", type=int, default=8)
    parser.add_argument("--dtype", default=None, help="bfloat16 or float32 (default: the config's)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    settings = load_settings(args.config, {"dtype": args.dtype} if args.dtype else None)
    cfg, dtype = run_settings.model_config(settings), run_settings.dtype(settings)
    rows = []
    for batch in map(int, args.batch.split(",")):
        rows.append({"impl": "ours", "batch": batch, **ours(cfg, dtype, batch, args.prompt, args.new, args.steps_per_call)})
    for batch in map(int, (args.transformers_batch or args.batch).split(",")):
        if batch:
            rows.append({"impl": "transformers", "batch": batch, **transformers_generate(cfg, dtype, batch, args.prompt, args.new)})
    header = (f"{args.config} ({jnp.dtype(dtype)}), prompt {args.prompt}, {args.new} new tokens, greedy; "
              f"{machine()}")  # fmt: skip
    print(header)
    print("| impl | batch | decode tok/s | step | prefill tok/s |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['impl']} | {row['batch']} | {row['decode_tok_s']:,.0f} | {row['step_ms']:.1f} ms "
              f"| {row['prefill_tok_s']:,.0f} |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": header, "rows": rows, "devices": str(jax.devices())}, f, indent=2)


if __name__ == "__main__":
    main()
