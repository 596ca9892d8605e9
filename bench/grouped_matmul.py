"""The expert matmul alone: our grouped kernel (dense bf16 and MXFP4) against XLA's peers, at one layer of a
config's shape, with its error against a float32 reference and the bandwidth it reaches.

    python bench/grouped_matmul.py --config=configs/gpt_oss_20b.py --tokens=1,8,64,256,8192   # on a GPU
    python bench/grouped_matmul.py --config=configs/gpt_oss_20b.py --tokens=1,8,64 --sweep=1,8   # tile choices
    python bench/grouped_matmul.py --config=configs/tiny.py --tokens=1,8 --interpret          # check on a CPU

Each case routes `tokens` random tokens to top-k of E experts and multiplies their rows by the gate_up
matrices ([E, hidden, 2 x intermediate]); a call's time is that of 8 calls on different inputs in one
compiled function (each with its own weights), divided by 8, so that dispatch is left out. Bytes counted: the distinct experts' matrices (each read once) and
the rows in and out. Peers: `ragged_dot` over the sorted rows (XLA), and gathering each row's expert
matrix by index (`w[e]`, as a batched matmul; only where that fits, up to 64 tokens). At the token counts in
`--sweep`, our kernel is also timed with other tiles than its default (column tile, split of the
contraction, warps).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from common import load_settings, machine, run_times
from gptoss_dist import mxfp4
from gptoss_dist import settings as run_settings
from gptoss_dist.grouped_matmul import Tiles, default_tiles, grouped_matmul
from gptoss_dist.model import row_blocks


CALLS = 8  # calls timed inside one compiled function, on different inputs, to leave out dispatch


def time_per_call(run, repeats: int = 10) -> float:
    """Seconds per call of `run` (which makes CALLS calls), the median of `repeats` after a warm-up."""
    return float(np.median(run_times(run, repeats))) / CALLS


def random_weights(cfg, rng) -> tuple[mxfp4.PackedMatrices, jax.Array]:
    """gate_up matrices of one layer, as MXFP4 and decoded to bf16 (the same values)."""
    experts, fan_in, fan_out = cfg.num_experts, cfg.hidden_size, 2 * cfg.intermediate_size
    blocks = rng.integers(0, 256, (experts, fan_out, fan_in // 32, 16), dtype=np.uint8)
    scales = rng.integers(118, 124, (experts, fan_out, fan_in // 32), dtype=np.uint8)
    packed = mxfp4.PackedMatrices(jnp.asarray(blocks), jnp.asarray(scales))
    return packed, jnp.stack([packed.matrix(e, jnp.bfloat16) for e in range(experts)])


def tile_choices(cfg, blocks, packed: bool) -> list[Tiles]:
    """The default tiles, then others for `--sweep`: column tiles of 64 and 128, splits of the contraction
    that divide it, 4 and 8 warps."""
    fan_in, fan_out = cfg.hidden_size, 2 * cfg.intermediate_size
    default = default_tiles(blocks.expert.shape[0], blocks.size, fan_in, fan_out, packed)
    steps = fan_in // (default.inner * 32 if packed else default.inner)
    others = [dataclasses.replace(default, out=out, split=split, warps=warps)
              for out in (64, 128) for split in (1, 3, 5, 9) for warps in (4, 8)
              if steps % split == 0 and (warps == 4 or split == 1)]  # fmt: skip
    return [default, *[tiles for tiles in others if tiles != default]]


def case(cfg, weight_sets: list, bias, tokens: int, rng, interpret: bool, sweep: bool) -> list[dict]:
    """One routing of `tokens` tokens, through each implementation; `weight_sets` holds CALLS (packed, dense)
    pairs, a different one per call, so that no call finds the weights in the cache and XLA cannot merge
    the calls' matmuls into one that reads the weights once."""
    packed_sets, dense_sets = zip(*weight_sets)
    dense = dense_sets[0]
    experts, k = cfg.num_experts, cfg.experts_per_token
    chosen = np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens)]).reshape(-1)
    group = np.sort(chosen)
    sizes = np.bincount(group, minlength=experts)
    inputs = jnp.asarray(rng.standard_normal((CALLS, group.size, cfg.hidden_size)), jnp.bfloat16)
    group_j, sizes_j = jnp.asarray(group), jnp.asarray(sizes, jnp.int32)

    blocks = row_blocks(group_j, sizes_j, experts, smallest=16)

    def ours(x, weights, tiles=None):
        out = grouped_matmul(blocks.pad(x), weights, bias, blocks.expert, blocks.size, tiles=tiles,
                             interpret=interpret)  # fmt: skip
        return blocks.unpad(out)

    def ragged(x, weights):
        return jax.lax.ragged_dot(x, weights, sizes_j) + bias[group_j]

    def gathered(x, weights):
        return jnp.einsum("ri,rio->ro", x, weights[group_j]) + bias[group_j]

    checked = slice(0, min(group.size, 256))  # rows compared with the float32 reference
    x0 = np.asarray(inputs[0, checked], np.float32)
    reference = np.einsum("ri,rio->ro", x0, np.asarray(dense, np.float32)[group[checked]])  # call 0's weights
    reference += np.asarray(bias, np.float32)[group[checked]]
    distinct = int(np.count_nonzero(sizes))
    io_bytes = inputs[0].nbytes + group.size * dense.shape[-1] * 2
    packed = packed_sets[0]
    weight_bytes = {"dense": dense[0].nbytes, "packed": packed.blocks[0].nbytes + packed.scales[0].nbytes}
    runs = []
    for kind, weights in (("dense", list(dense_sets)), ("packed", list(packed_sets))):
        choices = tile_choices(cfg, blocks, kind == "packed")
        runs += [("ours", kind, partial(ours, tiles=tiles), weights, tiles) for tiles in choices[: None if sweep else 1]]
    runs.append(("ragged_dot", "dense", ragged, list(dense_sets), None))
    if tokens <= 64:
        runs.append(("gather", "dense", gathered, list(dense_sets), None))
    rows = []
    for impl, kind, fn, weights, tiles in runs:
        row = {"tokens": tokens, "impl": impl, "weights": kind, "distinct_experts": distinct}
        if tiles is not None:
            row["tiles"] = dataclasses.asdict(tiles)
        try:
            every_call = jax.jit(lambda xs, ws, fn=fn: [fn(xs[i], ws[i]) for i in range(CALLS)])
            out = np.asarray(every_call(inputs, weights)[0][checked], np.float32)
            row["rel_error"] = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
            seconds = time_per_call(lambda: every_call(inputs, weights))
            row["us"] = seconds * 1e6
            row["GB_s"] = (distinct * weight_bytes[kind] + io_bytes) / seconds / 1e9
        except Exception as error:  # noqa: BLE001 - a failing peer is a result, the rest still run
            row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/gpt_oss_20b.py")
    parser.add_argument("--tokens", default="1,8,64,256,8192")
    parser.add_argument("--interpret", action="store_true", help="run the kernel in Pallas' interpreter")
    parser.add_argument("--sweep", default="", help="token counts at which to time other tiles than the default")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cfg = run_settings.model_config(load_settings(args.config))
    rng = np.random.default_rng(0)
    weight_sets = [random_weights(cfg, rng) for _ in range(CALLS)]
    bias = jnp.asarray(rng.standard_normal((cfg.num_experts, 2 * cfg.intermediate_size)) * 0.1, jnp.bfloat16)
    rows = []
    for tokens in map(int, args.tokens.split(",")):
        sweep = tokens in [int(t) for t in args.sweep.split(",") if t]
        rows += case(cfg, weight_sets, bias, tokens, rng, args.interpret, sweep)
        if args.json:  # rewritten after each case, so that a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"machine": machine(), "config": args.config, "rows": rows}, f, indent=2)
    print(f"\n{args.config} gate_up, {machine()}")
    print("| tokens | impl | weights | tiles (out, inner, split, warps) | experts read | time | GB/s | rel. error |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        timing = f"{r['us']:,.0f} us | {r['GB_s']:,.0f}" if "us" in r else f"{r.get('error', '')[:60]} | -"
        tiles = ", ".join(str(r["tiles"][k]) for k in ("out", "inner", "split", "warps")) if "tiles" in r else ""
        print(f"| {r['tokens']} | {r['impl']} | {r['weights']} | {tiles} | {r['distinct_experts']} | {timing} "
              f"| {r.get('rel_error', float('nan')):.1e} |")  # fmt: skip


if __name__ == "__main__":
    main()
