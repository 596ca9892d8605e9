"""The plan's model of a chip's working memory, where it differs by chip (what each term is: BENCHMARKS.md)."""

import pytest

from gptoss_dist import plan
from gptoss_dist.config import FULL, SLIDING, ModelConfig

ROW = 2944 * 2  # a bf16 row of the 20B's 2,880 widths, padded to the 128 lanes


@pytest.mark.parametrize(
    ("prefill_tokens", "mesh", "packed", "beyond_v6e"),
    [
        # 2 chunks of 4,096 tokens: a second chunk's 16,384 token copies and experts' rows, a layer's gate_up
        (8192, (1, 8, 1), False, 3 * 8192 * ROW + 2 * 16384 * ROW + 32 * 2880 * (5760 // 8) * 2),
        (4096, (1, 8, 1), False, 3 * 4096 * ROW + 16384 * ROW),  # one chunk: its token copies in both tilings
        (4096, (1, 2, 4), True, 3 * 4096 * ROW),  # one chunk into the packed experts' kernel
    ],
    ids=["bf16-two-chunks", "bf16-one-chunk", "packed-one-chunk"],
)
def test_on_tpu7x_a_prefill_call_holds_what_its_dumps_show_beyond_a_v6e(prefill_tokens, mesh, packed, beyond_v6e):
    """tpu7x's prefill: three more buffers of the tokens' rows, and where the experts loop over chunks a second
    chunk and the layer's bf16 gate_up re-tiled for the loop; bf16 experts in one chunk hold their token copies
    twice."""
    cfg = ModelConfig(num_layers=2, layer_types=(SLIDING, FULL))
    sizes = dict(zip(("data", "tensor", "expert"), mesh))
    tpu7x, v6e = (
        plan.plan_memory(cfg, sizes, max_slots=64, max_len=8192, prefill_tokens=prefill_tokens, packed_experts=packed,
                         chip=chip).prefill_working
        for chip in ("tpu7x", "v6e")
    )  # fmt: skip
    assert tpu7x - v6e == beyond_v6e


@pytest.mark.parametrize(
    ("slots", "mesh", "chip", "in_hbm"),
    [
        (64, (1, 8, 1), "v6e", 8),  # 8 rows a chip (6.1 MiB): one buffer in HBM, the rest on chip
        (512, (1, 8, 1), "v6e", 4 * 64),  # 64 rows a chip (49 MiB): four in HBM
        (512, (1, 8, 1), "v5e", 3 * 64),
        (64, (1, 4, 1), "v5p", 4 * 16),  # 16 rows (12.3 MiB) are past v5p's on-chip share
        (4, (1, 8, 1), "v6e", 4),  # 4 rows do not divide over 8 devices: every row on each chip of the data shard
        (12, (2, 2, 2), "v6e", 6),  # nor 12 rows over 8: each data shard's 6
    ],
)
def test_decode_sampling_counts_a_chip_s_rows_of_the_vocabulary(slots, mesh, chip, in_hbm):
    """Sampling's float32 rows of the whole vocabulary: a chip's share of the slots where they divide over the
    mesh (else its data shard's), one buffer in HBM while a buffer fits the chip's on-chip share, else the
    chip's count of them (buffer dumps: BENCHMARKS.md)."""
    cfg = ModelConfig(num_layers=2, layer_types=(SLIDING, FULL))
    sizes = dict(zip(("data", "tensor", "expert"), mesh))
    working = plan.plan_memory(cfg, sizes, max_slots=slots, max_len=8192, chip=chip).decode_working
    layers = 2 * (plan.DECODE_BYTES_PER_LAYER + 2 * cfg.num_experts // sizes["expert"] * ROW)
    assert working - layers == in_hbm * cfg.vocab_size * 4


@pytest.mark.parametrize(("slots", "mesh", "chip", "counted"), [
    (64, (1, 2, 4), "v6e", False),  # 4 KV heads a chip: a layer's window 8 MiB, on chip
    (288, (1, 2, 4), "v6e", True),  # 36 MiB a layer: in HBM, as at 288 slots of the 20B packed on v6e:2x4
    (64, (1, 2, 4), "tpu7x", True),  # tpu7x keeps none on chip
])  # fmt: skip
def test_decode_counts_the_windows_re_laid_for_attention_where_a_layer_s_does_not_fit_on_chip(
    slots, mesh, chip, counted
):
    cfg = ModelConfig(num_layers=2, layer_types=(SLIDING, FULL))
    sizes = dict(zip(("data", "tensor", "expert"), mesh))
    with_rings, without = (
        plan.plan_memory(cfg, sizes, max_slots=slots, max_len=8192, chip=chip, rings=rings).decode_working
        for rings in (True, False)
    )
    window = slots * cfg.sliding_window * 4 * cfg.head_dim * 2 * 2  # keys and values, 4 KV heads a chip, bf16
    assert with_rings - without == (window if counted else 0)
