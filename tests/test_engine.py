"""The decoding engine: greedy tokens equal transformers' generate, seeded sampling is reproducible
anywhere, the cache keeps only what each layer needs, and continuous batching keeps slots busy."""

import jax.numpy as jnp
import pytest
from engine_fixtures import CONFIG, PROMPT_LENGTHS, mesh_of, mixed_engine, prompts, streamed
from reference import load_reference

from gptoss_dist import from_pretrained
from gptoss_dist.engine import Engine, Request, cache_bytes_per_sequence
from gptoss_dist.model import cache_length

pytest_plugins = ["engine_fixtures"]


@pytest.fixture(scope="module")
def transformers_greedy(checkpoint):
    import torch

    reference = load_reference(checkpoint)
    outputs = []
    for prompt in prompts():
        ids = torch.tensor([prompt])
        out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=36, do_sample=False)
        outputs.append(out[0, len(prompt) :].tolist())
    return outputs


@pytest.mark.parametrize("shape", [None, (2, 2, 2)], ids=["unsharded", "mesh-2x2x2"])
def test_greedy_tokens_equal_transformers_generate(checkpoint, model, transformers_greedy, shape):
    mesh = mesh_of(shape) if shape else None
    model = from_pretrained(checkpoint, dtype=jnp.float32, mesh=mesh) if mesh else model
    engine = Engine(model, mesh, max_slots=4, max_len=96, steps_per_call=8)
    results = engine.generate([Request(p, max_new_tokens=36, id=i) for i, p in enumerate(prompts())])
    for result, expected in zip(results, transformers_greedy, strict=True):
        assert result.tokens == expected, f"request {result.id}"
        assert result.finish_reason == "length"
        assert result.prompt_tokens == PROMPT_LENGTHS[result.id] and result.completion_tokens == 36


def sampled(prompt, **settings):
    return Request(prompt, max_new_tokens=24, temperature=1.0, top_k=40, top_p=0.9, seed=1234, id="probe", **settings)


def test_seeded_sampling_depends_only_on_the_request(checkpoint, model):
    probe = prompts([11], seed=7)[0]
    others = [Request(p, max_new_tokens=n, temperature=0.8, seed=i) for i, (p, n) in
              enumerate(zip(prompts(), (5, 30, 2, 12, 7, 3)))]  # fmt: skip

    def probe_tokens(engine, requests):
        return next(r.tokens for r in engine.generate(requests) if r.id == "probe")

    alone = probe_tokens(Engine(model, max_slots=1, max_len=64), [sampled(probe)])
    assert len(set(alone)) > 3  # really sampled
    # four slots of 96, as in the greedy test, whose compiled calls these engines reuse
    in_batch = probe_tokens(Engine(model, max_slots=4, max_len=96), [others[1], sampled(probe), *others[2:4]])
    after_refill = probe_tokens(Engine(model, max_slots=4, max_len=96), [*others, sampled(probe)])
    mesh = mesh_of((2, 2, 2))
    sharded = from_pretrained(checkpoint, dtype=jnp.float32, mesh=mesh)
    on_mesh = probe_tokens(Engine(sharded, mesh, max_slots=4, max_len=96), [*others[:5], sampled(probe)])
    # eight slots: each of the mesh's eight devices samples its own row (four: each data shard samples its two)
    row_a_device = probe_tokens(Engine(sharded, mesh, max_slots=8, max_len=96), [*others, sampled(probe)])
    assert alone == in_batch == after_refill == on_mesh == row_a_device
    other_seed = Engine(model, max_slots=1, max_len=64).generate([Request(probe, 24, 1.0, 40, 0.9, seed=99)])
    assert other_seed[0].tokens != alone


def test_sliding_layers_keep_only_their_window(model):
    engine = Engine(model, max_slots=4, max_len=64)
    slots = engine.empty_slots()
    for layer, cache in enumerate(slots.cache):
        expected = CONFIG.sliding_window if CONFIG.window(layer) else 64
        assert cache.kv.shape == (4, CONFIG.num_kv_heads, expected, 2 * CONFIG.head_dim)
    assert [cache_length(CONFIG, layer, 64) for layer in range(3)] == [8, 64, 8]
    per_position = 2 * CONFIG.num_kv_heads * CONFIG.head_dim * 4
    assert engine.cache_bytes_per_sequence() == per_position * (8 + 64 + 8)
    # GPT-OSS-20B at 8k context: 12 layers keep 128 positions, 12 keep 8192.
    from gptoss_dist import ModelConfig

    assert cache_bytes_per_sequence(ModelConfig(), 8192) == 2 * 8 * 64 * 2 * (12 * 128 + 12 * 8192)


def ideal_slot_steps(budgets: list[int], slots: int) -> int:
    """Slot-steps of continuous batching refilled at every step: first come, first served; a request's first
    token comes from its prefill, each later one takes a decode step of every slot."""
    waiting, running, steps = list(budgets), [], 0
    while waiting or running:
        while waiting and len(running) < slots:
            remaining = waiting.pop(0) - 1
            if remaining:
                running.append(remaining)
        if running:
            steps += 1
            running = [r - 1 for r in running if r > 1]
    return steps * slots


@pytest.mark.parametrize("overlap", [False, True], ids=["in-turn", "overlap"])
def test_continuous_batching_keeps_slots_busy(model, overlap):
    budgets = [60, 2, 5, 45, 1, 30, 8, 3, 50, 12]
    requests = [Request(p, max_new_tokens=n, id=i) for i, (p, n) in enumerate(zip(prompts([4] * 10, seed=3), budgets))]
    engine = Engine(model, max_slots=4, max_len=96, steps_per_call=4, overlap=overlap)
    results = engine.generate(requests)
    assert [len(r.tokens) for r in results] == budgets
    # A slot that ends mid-call idles until the call's end: at most steps_per_call - 1 steps per request.
    slack = len(budgets) * (engine.steps_per_call - 1) + engine.max_slots * engine.steps_per_call
    # Overlapped, the host learns that a slot ended one call late, so the slot is held for one more call.
    held = [budget + engine.steps_per_call * overlap for budget in budgets]
    assert engine.slot_steps <= ideal_slot_steps(held, 4) + slack
    static = sum(4 * (max(budgets[i : i + 4]) - 1) for i in range(0, 10, 4))  # batches of 4, run to the longest
    assert engine.slot_steps < 0.75 * static


def test_streamed_tokens_join_to_the_results(model, mixed):
    """Every prefill and decode call gives each request in it its new tokens; joined they are its result, for
    greedy and seeded requests refilling four slots."""
    requests, expected = mixed
    engine = mixed_engine(model)
    results, pieces = streamed(engine, requests)
    assert results == expected
    for request in requests:
        assert [token for piece in pieces[request.id] for token in piece] == expected[request.id].tokens
        # the prefill's first token, then up to steps_per_call tokens from each decode call
        rest = request.max_new_tokens - 1
        sizes = [len(piece) for piece in pieces[request.id]]
        assert sizes == [1] + [4] * (rest // 4) + ([rest % 4] if rest % 4 else []), request.id


def test_stop_tokens_and_context_limit(model):
    probe = prompts([6], seed=5)[0]
    engine = Engine(model, max_slots=2, max_len=64, stop_tokens=())  # no stop token but the request's
    free_run = engine.generate([Request(probe, max_new_tokens=12)])[0].tokens
    stop_at = free_run[4]
    stopped = engine.generate([Request(probe, max_new_tokens=12, stop=[stop_at])])[0]
    assert stopped.finish_reason == "stop"
    assert stopped.tokens == free_run[: free_run.index(stop_at) + 1]
    cut = Engine(model, max_slots=2, max_len=10).generate([Request(probe, max_new_tokens=12)])[0]
    assert cut.finish_reason == "context" and cut.tokens == free_run[:4]


@pytest.mark.parametrize(
    "request_, message",
    [
        (Request([], id="a"), "request 'a': empty prompt"),
        (Request([1] * 64, id="b"), "prompt of 64 tokens leaves no room"),
        (Request([1], max_new_tokens=0, id="c"), "max_new_tokens must be at least 1"),
        (Request([1], temperature=-1.0, id="d"), "temperature >= 0"),
        (Request([1000], id="e"), r"token ids must be in \[0, 128\)"),
    ],
)
def test_bad_requests_are_refused_by_name(model, request_, message):
    with pytest.raises(ValueError, match=message):
        Engine(model, max_slots=2, max_len=64).generate([request_])


def test_prompts_prefilled_in_pieces_give_transformers_greedy_tokens(model, transformers_greedy):
    """A budget of 16 tokens a call: the 20- and 40-token prompts go in 2 and 3 pieces, attention in blocks of
    4, and the 8-key windows of the sliding layers straddle the pieces. (test_long_context checks the logits of
    pieces on a 2x2x2 mesh.)"""
    engine = Engine(model, max_slots=4, max_len=96, steps_per_call=8, prefill_tokens=16, min_prefill_len=4,
                    attention_block=4)  # fmt: skip
    results = engine.generate([Request(p, max_new_tokens=36) for p in prompts()])
    assert [r.tokens for r in results] == transformers_greedy
    assert all(rows * width <= 16 for rows, width in engine.prefill_shapes)
    assert sum(engine.prefill_shapes.values()) >= 6  # the six prompts did not go in one call


def test_decoding_goes_on_while_a_long_prompt_is_prefilled(model):
    """A 60-token prompt admitted behind three short ones takes 4 pieces of 16; the short ones get tokens
    between its pieces, and every request gets the tokens it gets with its prompt in one piece."""
    lengths = (3, 5, 4, 60)
    requests = [Request(p, max_new_tokens=20, id=i) for i, p in enumerate(prompts(lengths, seed=9))]
    engine = Engine(model, max_slots=4, max_len=96, steps_per_call=2, prefill_tokens=16, min_prefill_len=4)
    long_started, short_tokens_meanwhile = False, 0
    results = {}
    for update in engine.stream(requests):
        if update.request.id == 3:
            long_started = True
        elif not long_started:
            short_tokens_meanwhile += len(update.tokens)
        if update.result is not None:
            results[update.result.id] = update.result.tokens
    prefill_calls = sum(engine.prefill_shapes.values())
    assert prefill_calls >= 5  # the short prompts' call and the long prompt's 4 pieces
    assert short_tokens_meanwhile >= 3 + 3 * 2 * 2  # first tokens, then 2 steps a decode call between pieces
    whole = Engine(model, max_slots=4, max_len=96, steps_per_call=2)  # each prompt in one piece
    assert [results[i] for i in range(4)] == [r.tokens for r in whole.generate(requests)]


@pytest.mark.parametrize("steps_per_call", [1, 3])
def test_overlapped_calls_change_no_token(model, steps_per_call):
    """Dispatching each call before reading the last one's tokens gives the same updates and results: greedy
    and seeded requests refilling 2 slots, stop tokens that end slots mid-call, a prompt in pieces, and a
    request that ends at its first token."""
    probe = prompts([6], seed=5)[0]
    stop_at = Engine(model, max_slots=1, max_len=64).generate([Request(probe, max_new_tokens=8)])[0].tokens[4]
    lengths, budgets = (6, 40, 3, 9, 20, 1), (8, 11, 1, 14, 5, 9)
    requests = [Request(p, max_new_tokens=n, temperature=0.9 * (i % 2), top_k=20, seed=i, stop=[stop_at], id=i)
                for i, (p, n) in enumerate(zip([probe, *prompts(lengths[1:], seed=2)], budgets))]  # fmt: skip

    def updates(overlap: bool) -> dict:
        engine = Engine(model, max_slots=2, max_len=64, steps_per_call=steps_per_call, prefill_tokens=16,
                        min_prefill_len=4, overlap=overlap)  # fmt: skip
        streamed = {request.id: [] for request in requests}
        for update in engine.stream(requests):
            streamed[update.request.id].append((update.tokens, update.result))
        return streamed

    overlapped, in_turn = updates(True), updates(False)
    assert overlapped == in_turn
    results = {id_: pieces[-1][1] for id_, pieces in in_turn.items()}
    assert all(result is not None for result in results.values())
    assert results[0].finish_reason == "stop" and results[0].tokens[-1] == stop_at
    assert {result.finish_reason for result in results.values()} >= {"stop", "length"}
