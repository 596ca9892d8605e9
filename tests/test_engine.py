"""The decoding engine: greedy tokens equal transformers' generate, seeded sampling is reproducible
anywhere, the cache keeps only what each layer needs, and continuous batching keeps slots busy."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import small_config
from gptoss_dist import from_pretrained
from gptoss_dist.engine import Engine, Request, cache_bytes, cache_bytes_per_sequence, page_pool
from gptoss_dist.model import cache_length
from gptoss_dist.random_checkpoint import write_random_checkpoint
from gptoss_dist.sharding import MESH_AXES, make_mesh
from reference import load_reference

CONFIG = small_config(num_heads=8, num_kv_heads=2, num_experts=8, experts_per_token=3, intermediate_size=96)
PROMPT_LENGTHS = (3, 20, 9, 40, 1, 13)  # several longer than the window of 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("engine-hf"), CONFIG, seed=4)


@pytest.fixture(scope="module")
def model(checkpoint):
    return from_pretrained(checkpoint, dtype=jnp.float32)


def prompts(lengths=PROMPT_LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in lengths]


def mesh_of(shape):
    return make_mesh(dict(zip(MESH_AXES, shape)), CONFIG, jax.devices()[: math.prod(shape)])


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
    in_batch = probe_tokens(Engine(model, max_slots=4, max_len=64), [others[1], sampled(probe), *others[2:4]])
    after_refill = probe_tokens(Engine(model, max_slots=4, max_len=64), [*others, sampled(probe)])
    mesh = mesh_of((2, 2, 2))
    sharded = from_pretrained(checkpoint, dtype=jnp.float32, mesh=mesh)
    on_mesh = probe_tokens(Engine(sharded, mesh, max_slots=4, max_len=64), [*others[:5], sampled(probe)])
    assert alone == in_batch == after_refill == on_mesh
    other_seed = Engine(model, max_slots=1, max_len=64).generate([Request(probe, 24, 1.0, 40, 0.9, seed=99)])
    assert other_seed[0].tokens != alone


def test_sliding_layers_keep_only_their_window(model):
    engine = Engine(model, max_slots=4, max_len=64)
    slots = engine.empty_slots()
    for layer, cache in enumerate(slots.cache):
        expected = CONFIG.sliding_window if CONFIG.window(layer) else 64
        assert cache.kv.shape == (4, expected, CONFIG.num_kv_heads, 2 * CONFIG.head_dim)
    assert [cache_length(CONFIG, layer, 64) for layer in range(3)] == [8, 64, 8]
    per_position = 2 * CONFIG.num_kv_heads * CONFIG.head_dim * 4
    assert engine.cache_bytes_per_sequence() == per_position * (8 + 64 + 8)
    # GPT-OSS-20B at 8k context: 12 layers keep 128 positions, 12 keep 8192.
    from gptoss_dist import ModelConfig

    assert cache_bytes_per_sequence(ModelConfig(), 8192) == 2 * 8 * 64 * 2 * (12 * 128 + 12 * 8192)


def test_with_prefix_caching_every_layer_keeps_its_keys_in_the_pool(model):
    """A sequence that starts after a cached prefix needs the window before it: the sliding layers' keys are in
    the pool of pages too, and the cache's bytes count them."""
    engine = Engine(model, max_slots=4, max_len=64, page_size=16, kv_pages=10, prefix_caching=True)
    for cache in engine.abstract_slots().cache:
        assert cache.kv.shape == (10, 16, CONFIG.num_kv_heads, 2 * CONFIG.head_dim) and not cache.ring
    per_position = 2 * CONFIG.num_kv_heads * CONFIG.head_dim * 4
    assert cache_bytes(CONFIG, 4, 64, 160, np.float32, rings=False) == per_position * 160 * CONFIG.num_layers
    assert cache_bytes(CONFIG, 4, 64, 160, np.float32) == per_position * (160 + 2 * 4 * 8)


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


@pytest.fixture(scope="module")
def mixed(model):
    """Greedy and seeded requests of several lengths, more than four slots hold, and their results from an
    engine with four slots and a page of max_len per slot."""
    budgets = (30, 3, 17, 1, 25, 9)
    requests = [Request(p, max_new_tokens=n, temperature=0.8 * (i % 2), top_k=20 * (i % 3), seed=i, id=i)
                for i, (p, n) in enumerate(zip(prompts(), budgets))]  # fmt: skip
    return requests, {result.id: result for result in mixed_engine(model).generate(requests)}


def mixed_engine(model, **pool):
    return Engine(model, max_slots=4, max_len=96, steps_per_call=4, min_prefill_len=64, **pool)  # few shapes


def streamed(engine, requests):
    """Each request's result and the tokens of its updates, checking that no update follows a result."""
    pieces = {request.id: [] for request in requests}
    results = {}
    for update in engine.stream(requests):
        assert update.request.id not in results, "an update after the request's result"
        pieces[update.request.id].append(update.tokens)
        if update.result is not None:
            results[update.request.id] = update.result
    return results, pieces


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


def test_paged_engine_gives_the_unpaged_tokens(model, mixed):
    """The full-attention layers' keys in a pool of pages of 8 positions, taken as the sequences grow, give
    each greedy and seeded request the tokens of a page of max_len per slot."""
    requests, expected = mixed
    engine = mixed_engine(model, page_size=8)
    assert engine.empty_slots().cache[1].kv.shape == (4 * 96 // 8, 8, CONFIG.num_kv_heads, 2 * CONFIG.head_dim)
    assert {result.id: result for result in engine.generate(requests)} == expected
    assert engine.preemptions == 0


def test_a_pool_too_small_preempts_and_every_request_completes_once(model, mixed):
    """6 pages of 16 hold one sequence of max_len and no more: the engine preempts the newest sequences and
    recomputes them later, and each request ends once, with its unpaged tokens."""
    requests, expected = mixed
    engine = mixed_engine(model, page_size=16, kv_pages=6)
    results, pieces = streamed(engine, requests)
    assert engine.preemptions > 0
    assert results == expected
    for request in requests:
        assert [token for piece in pieces[request.id] for token in piece] == expected[request.id].tokens


@pytest.fixture(scope="module")
def shared_prefix(model):
    """Requests whose prompts start with one prefix of 4 pages of 8 (one of them of 3 seeded samples), and their
    results without prefix caching, for 9 and for 40 new tokens each."""
    prefix = prompts((32,), seed=5)[0]
    requests = [Request(prefix + suffix, max_new_tokens=9, temperature=0.8 * (i % 2), seed=i, id=i, n=1 + 2 * (i == 1))
                for i, suffix in enumerate(prompts((3, 11, 1, 8, 5), seed=6))]  # fmt: skip
    longer = [dataclasses.replace(request, max_new_tokens=40) for request in requests]
    uncached = mixed_engine(model, page_size=8)
    return {"short": (requests, uncached.generate(requests)), "long": (longer, uncached.generate(longer))}


def cached_engine(model):
    """Prefix caching in a pool of 12 pages of 8: one sequence of max_len."""
    return mixed_engine(model, page_size=8, kv_pages=12, prefix_caching=True)


def test_a_shared_prefix_is_prefilled_once(model, shared_prefix):
    """With prefix caching, the prefix's pages are prefilled once and mapped by every later request and sample,
    which prefill only the rest of their prompts; their tokens are those of the uncached run."""
    requests, expected = shared_prefix["short"]
    engine = cached_engine(model)
    assert engine.generate(requests) == expected
    assert engine.preemptions == 0
    # the prefix, then each prompt's rest; request 1's samples 1 and 2 share its 5 full pages (40 of 43 tokens)
    assert [len(request.prompt) for request in requests] == [35, 43, 33, 40, 37]
    assert engine.prefilled_tokens == 32 + (3 + 11 + 1 + 8 + 5) + 2 * 3


def test_cached_prefixes_are_evicted_and_preempted_sequences_recomputed(model, shared_prefix):
    """Longer outputs than the pool of one max-length sequence holds at once: cached pages are evicted for room,
    sequences that share pages are preempted and recomputed, and every sample ends once with its uncached
    tokens."""
    requests, expected = shared_prefix["long"]
    engine = cached_engine(model)
    assert engine.generate(requests) == expected
    assert engine.preemptions > 0


def test_a_preempted_sequence_keeps_its_scores(model, mixed):
    """Requests that score their tokens (3 alternatives each) and prompts, one with n=2, in a pool too small for
    them: every sample ends with the tokens, scores and prompt scores it has without preemption, the prompt
    scored once (the generated tokens a preempted sequence prefills again are not prompt tokens)."""
    requests, _ = mixed
    scored = [dataclasses.replace(request, logprobs=True, top_logprobs=3, prompt_logprobs=True, n=1 + (i == 1))
              for i, request in enumerate(requests)]  # fmt: skip
    expected = mixed_engine(model).generate(scored)
    engine = mixed_engine(model, page_size=16, kv_pages=6)
    results = engine.generate(scored)
    assert engine.preemptions > 0
    assert [(result.id, result.index) for result in results] == [(result.id, result.index) for result in expected]
    for result, unpreempted in zip(results, expected, strict=True):
        assert result.tokens == unpreempted.tokens
        assert len(result.logprobs) == len(result.tokens)
        assert [(s.rank, [t for t, _ in s.top]) for s in result.logprobs] == [
            (s.rank, [t for t, _ in s.top]) for s in unpreempted.logprobs
        ]
        np.testing.assert_allclose([[s.logprob, *(lp for _, lp in s.top)] for s in result.logprobs],
                                   [[s.logprob, *(lp for _, lp in s.top)] for s in unpreempted.logprobs],
                                   rtol=0, atol=1e-5)  # fmt: skip
        prompt = next(request.prompt for request in scored if request.id == result.id)
        assert [token for token, _ in result.prompt_logprobs] == prompt[1:]
        np.testing.assert_allclose([lp for _, lp in result.prompt_logprobs],
                                   [lp for _, lp in unpreempted.prompt_logprobs], rtol=0, atol=1e-5)  # fmt: skip


def test_n_samples_are_the_requests_seeded_seed_plus_index(model, mixed):
    """A seeded request with n=3 among others: sample 0 is its completion with n=1, and sample i that of the
    request seeded seed + i; the samples differ."""
    requests, expected = mixed
    probe = requests[1]  # temperature 0.8, top-k 20, seed 1
    reseeded = [dataclasses.replace(probe, seed=probe.seed + i, id=f"seed+{i}") for i in (1, 2)]
    results = mixed_engine(model).generate([dataclasses.replace(probe, n=3), requests[0], *reseeded])
    samples, alone = results[:3], {result.id: result.tokens for result in results[3:]}
    assert [sample.index for sample in samples] == [0, 1, 2] and {sample.id for sample in samples} == {probe.id}
    assert samples[0] == expected[probe.id]
    assert [sample.tokens for sample in samples[1:]] == [alone["seed+1"], alone["seed+2"]]
    assert len({tuple(sample.tokens) for sample in samples}) == 3
    with pytest.raises(ValueError, match=r"n must be in \[1, 64\], not 65"):
        mixed_engine(model).generate([dataclasses.replace(probe, n=65)])


@pytest.mark.parametrize(
    "pool, message",
    [
        ({"page_size": 7}, "page_size=7 must divide max_len=96"),
        ({"page_size": 8, "kv_pages": 11}, "kv_pages=11 cannot hold one sequence of max_len=96, which takes 12 pages"),
        ({"page_size": -8}, "must be >= 0"),
    ],
)
def test_bad_page_settings_are_refused_by_name(model, pool, message):
    with pytest.raises(ValueError, match=message):
        mixed_engine(model, **pool)
    with pytest.raises(ValueError, match="kv_pages=13 must be a multiple of the mesh's data axis"):
        page_pool(4, 96, 8, 13, data=2)
    assert page_pool(4, 96) == (96, 4) and page_pool(4, 96, 8) == (8, 48)


def test_stop_tokens_and_context_limit(model):
    probe = prompts([6], seed=5)[0]
    free_run = Engine(model, max_slots=2, max_len=64).generate([Request(probe, max_new_tokens=12)])[0].tokens
    stop_at = free_run[4]
    stopped = Engine(model, max_slots=2, max_len=64, stop_tokens=()).generate(
        [Request(probe, max_new_tokens=12, stop=[stop_at])]
    )[0]
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
