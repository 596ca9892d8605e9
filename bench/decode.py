"""Decode throughput by batch size: ours (the engine) and transformers' `generate`, in the same run.

    python bench/decode.py --config=configs/tiny.py --batch=1,8,32
    python bench/decode.py --config=configs/mid.py --batch=1,8 --transformers_batch=1,8
    python bench/decode.py --config=configs/tiny.py --batch=1,8 --steps_per_call=1,4,16 --overlap=both \
        --transformers_batch=0

Random weights of the config's shape. Each batch runs B prompts of --prompt tokens for --new greedy tokens;
prefill time is a run with one new token, decode time the rest. transformers runs on the same weights'
shape (random too), eager attention, in the config's dtype. On a GPU, `bench/gpu_decode.py` measures the
same figures against the card's weight-bytes bound.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from common import best_time, load_settings, machine
from gptoss_dist import settings as run_settings
from gptoss_dist.config import ModelConfig
from gptoss_dist.engine import Engine, Request
from gptoss_dist.model import random_model


def random_prompts(vocab_size: int, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, length).tolist() for _ in range(batch)]


def throughput(batch: int, prompt: int, new: int, prefill_s: float, total_s: float) -> dict:
    """Figures of a run of `new` tokens (`total_s`) and one of a single token (`prefill_s`)."""
    decode_s = total_s - prefill_s
    return {"prefill_tok_s": batch * prompt / prefill_s, "decode_tok_s": batch * (new - 1) / decode_s,
            "step_ms": decode_s / (new - 1) * 1e3}  # fmt: skip


def engine_run(engine: Engine, prompts: list[list[int]], new: int) -> Callable[[], object]:
    """A greedy run of `prompts` for `new` tokens each."""
    return lambda: engine.generate([Request(p, max_new_tokens=new) for p in prompts])


def engine_generate(engine: Engine, prompts: list[list[int]], new: int, repeats: int = 3) -> dict:
    """Our prefill and decode figures; each time is the best of `repeats` runs after one that compiles."""
    prefill = best_time(engine_run(engine, prompts, 1), repeats)
    total = best_time(engine_run(engine, prompts, new), repeats)
    return throughput(len(prompts), len(prompts[0]), new, prefill, total)


def transformers_model(cfg: ModelConfig, dtype):
    """transformers' `GptOssForCausalLM` of the config's shape, random weights made in `dtype` (on the GPU
    when there is one), eager attention."""
    import torch
    from transformers import AutoModelForCausalLM, GptOssConfig

    torch_dtype = {jnp.bfloat16: torch.bfloat16, jnp.float32: torch.float32}[dtype]
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(
            GptOssConfig(**cfg.to_hf_dict()), dtype=torch_dtype, attn_implementation="eager"
        )
    return model.eval()


def transformers_generate(model, batch: int, prompt: int, new: int, repeats: int = 3) -> dict:
    """`model.generate`'s prefill and decode figures (greedy); each time is the best of `repeats` runs."""
    import torch

    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=model.device)

    def run(tokens: int):
        def generate():
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                               min_new_tokens=tokens, do_sample=False)  # fmt: skip
            if ids.is_cuda:
                torch.cuda.synchronize()

        return generate

    prefill, total = best_time(run(1), repeats), best_time(run(new), repeats)
    return throughput(batch, prompt, new, prefill, total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes for ours")
    parser.add_argument("--transformers_batch", default=None, help="batch sizes for transformers (default: --batch)")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--steps_per_call", default="8", help="comma-separated decode steps per call")
    parser.add_argument("--overlap", choices=("on", "off", "both"), default="on",
                        help="the engine reads a call's tokens while the next runs (on), or after (off)")
    parser.add_argument("--dtype", default=None, help="bfloat16 or float32 (default: the config's)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    settings = load_settings(args.config, {"dtype": args.dtype} if args.dtype else None)
    cfg, dtype = run_settings.model_config(settings), run_settings.dtype(settings)
    rows = []
    model = random_model(cfg, dtype=dtype)
    overlaps = {"on": [True], "off": [False], "both": [False, True]}[args.overlap]
    for batch in map(int, args.batch.split(",")):
        prompts = random_prompts(cfg.vocab_size, batch, args.prompt)
        for steps in map(int, args.steps_per_call.split(",")):
            for overlap in overlaps:
                engine = Engine(model, max_slots=batch, max_len=args.prompt + args.new, steps_per_call=steps,
                                stop_tokens=(), overlap=overlap)  # fmt: skip
                rows.append({"impl": "ours", "batch": batch, "steps_per_call": steps, "overlap": overlap,
                             **engine_generate(engine, prompts, args.new)})  # fmt: skip
    del model, engine
    transformers_batches = [b for b in map(int, (args.transformers_batch or args.batch).split(",")) if b]
    if transformers_batches:
        reference = transformers_model(cfg, dtype)
        for batch in transformers_batches:
            rows.append({"impl": "transformers", "batch": batch,
                         **transformers_generate(reference, batch, args.prompt, args.new)})  # fmt: skip
    header = (f"{args.config} ({jnp.dtype(dtype)}), prompt {args.prompt}, {args.new} new tokens, greedy; "
              f"{machine()}")  # fmt: skip
    print(header)
    print("| impl | batch | steps a call | overlap | decode tok/s | step | prefill tok/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['impl']} | {row['batch']} | {row.get('steps_per_call', '')} | {row.get('overlap', '')} "
              f"| {row['decode_tok_s']:,.0f} | {row['step_ms']:.1f} ms | {row['prefill_tok_s']:,.0f} |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": header, "rows": rows, "devices": str(jax.devices())}, f, indent=2)


if __name__ == "__main__":
    main()
