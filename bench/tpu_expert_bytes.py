"""Bytes of expert weights a decode step reads on TPUs, by construction (no TPU is timed), and the step time
they imply at each chip's HBM bandwidth.

    python bench/tpu_expert_bytes.py

Per layer and decode step, at B tokens each routed to k of E experts (uniformly, independently: an expert is
used with probability 1 - (1 - k/E)^B):
- the TPU kernel (`gptoss_dist.tpu_grouped_matmul`) on packed experts reads each used expert's FP4 codes,
  scales and bias once (the scales placed expert-major, `sharding.param_formats`);
- the dense path reads each used expert's bf16 matrices and bias (if XLA's `ragged_dot` reads every expert's,
  as its cost analysis counts, the last column's figure).
Prints a Markdown table: bytes for the whole model per step, and the time those bytes take at one chip's HBM
bandwidth (on n chips holding equal shares of the experts, divide by n).
"""

from __future__ import annotations

import runpy
from pathlib import Path

from common import HBM_BYTES_PER_S

from gptoss_dist import mxfp4
from gptoss_dist.settings import model_config

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"20B": "gpt_oss_20b.py", "120B": "gpt_oss_120b.py"}
TOKENS = (1, 8, 64, 256)
BF16 = 2


def expert_bytes(hidden: int, intermediate: int) -> dict[str, int]:
    """One expert's bytes: packed codes, packed scales, bf16 matrices, bf16 biases."""
    values = hidden * 2 * intermediate + intermediate * hidden  # gate_up [hidden, 2I] and down [I, hidden]
    return {"codes": values // 2, "scales": values // mxfp4.VALUES_PER_BLOCK, "dense": values * BF16,
            "bias": (2 * intermediate + hidden) * BF16}  # fmt: skip


def rows() -> list[str]:
    header = ("| model | B | experts used a layer (of E) | kernel, packed | dense bf16, used experts | dense bf16, every "
              "expert | kernel step at v5e / v6e / v5p | dense (used) step at v5e / v6e / v5p |")  # fmt: skip
    lines = [header, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, file in MODELS.items():
        cfg = model_config(runpy.run_path(str(ROOT / "configs" / file))["get_config"]())
        each = expert_bytes(cfg.hidden_size, cfg.intermediate_size)
        experts, k = cfg.num_experts, cfg.experts_per_token
        for tokens in TOKENS:
            used = experts * (1 - (1 - k / experts) ** tokens)
            kernel = cfg.num_layers * used * (each["codes"] + each["scales"] + each["bias"])
            dense = cfg.num_layers * used * (each["dense"] + each["bias"])
            every = cfg.num_layers * experts * (each["dense"] + each["bias"])
            times = [" / ".join(f"{b / rate * 1e3:.1f}" for rate in HBM_BYTES_PER_S.values()) for b in (kernel, dense)]
            lines.append(f"| {name} | {tokens} | {used:.1f} of {experts} | {kernel / 1e9:.2f} GB | {dense / 1e9:.2f} GB "
                         f"| {every / 1e9:.2f} GB | {times[0]} ms | {times[1]} ms |")  # fmt: skip
    return lines


if __name__ == "__main__":
    print("\n".join(rows()))
