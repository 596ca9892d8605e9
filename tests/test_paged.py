"""The paged KV cache: pages taken as sequences grow give the unpaged tokens, a pool too small preempts and
recomputes without changing a token, shared prefixes are prefilled once (and a preempted request's scored
prompt too), and n samples per request."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from engine_fixtures import CONFIG, mesh_of, mixed_engine, prompts, streamed

from gptoss_dist import from_pretrained
from gptoss_dist.engine import Engine, Request, cache_bytes, page_pool

pytest_plugins = ["engine_fixtures"]


def test_with_prefix_caching_every_layer_keeps_its_keys_in_the_pool(model):
    """A sequence that starts after a cached prefix needs the window before it: the sliding layers' keys are in
    the pool of pages too, and the cache's bytes count them."""
    engine = Engine(model, max_slots=4, max_len=64, page_size=16, kv_pages=10, prefix_caching=True)
    for cache in engine.abstract_slots().cache:
        assert cache.kv.shape == (10, CONFIG.num_kv_heads, 16, 2 * CONFIG.head_dim) and not cache.ring
    per_position = 2 * CONFIG.num_kv_heads * CONFIG.head_dim * 4
    assert cache_bytes(CONFIG, 4, 64, 160, np.float32, rings=False) == per_position * 160 * CONFIG.num_layers
    assert cache_bytes(CONFIG, 4, 64, 160, np.float32) == per_position * (160 + 2 * 4 * 8)


def test_paged_engine_gives_the_unpaged_tokens(model, mixed):
    """The full-attention layers' keys in a pool of pages of 8 positions, taken as the sequences grow, give
    each greedy and seeded request the tokens of a page of max_len per slot."""
    requests, expected = mixed
    engine = mixed_engine(model, page_size=8)
    assert engine.empty_slots().cache[1].kv.shape == (4 * 96 // 8, CONFIG.num_kv_heads, 8, 2 * CONFIG.head_dim)
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


def test_a_preempted_request_maps_its_scored_prompts_cached_pages_again(model):
    """A request that scores its prompt prefills all of it, cached or not (its positions' logits are the scores),
    but once preempted it has them: it maps its prompt's pages, still cached, and prefills only the rest, with
    the tokens and scores it has unpreempted."""
    requests = [Request(prompt, max_new_tokens=30, id=i, prompt_logprobs=i == 1)
                for i, prompt in enumerate(prompts((8, 40), seed=7))]  # fmt: skip
    expected = mixed_engine(model).generate(requests)
    engine = cached_engine(model)
    results = engine.generate(requests)
    assert engine.preemptions > 0
    # both prompts, then less than the scored prompt's 40 tokens (5 full pages) again
    assert engine.prefilled_tokens < 8 + 40 + 40
    assert [result.tokens for result in results] == [result.tokens for result in expected]
    np.testing.assert_allclose([lp for _, lp in results[1].prompt_logprobs],
                               [lp for _, lp in expected[1].prompt_logprobs], rtol=0, atol=1e-5)  # fmt: skip


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
    with pytest.raises(ValueError, match=r"max_slots=3 must be a multiple of the mesh's data axis \(2\)"):
        page_pool(3, 96, 8, 16, data=2)
    with pytest.raises(ValueError, match="kv_pages=13 must be a multiple of the mesh's data axis"):
        page_pool(4, 96, 8, 13, data=2)
    with pytest.raises(ValueError, match="kv_pages=18, 9 in each of the mesh's 2 data shards, cannot hold one"):
        page_pool(4, 96, 8, 18, data=2)
    assert page_pool(4, 96) == (96, 4) and page_pool(4, 96, 8) == (8, 48)



def test_the_engine_with_the_kernel_gives_the_blockwise_tokens(checkpoint, model, mixed):
    """Decode steps read the pool with the TPU kernel (Pallas' interpreter here), with the slots and the pool
    split over `data` (each shard's kernel reads its own part of the pool) and the KV heads over `tensor`: pages
    of 8 and prefix caching, so that the sliding layers read their window out of the pool too, in a pool of one
    max_len sequence a shard, where two of these sequences do not fit, so that shards preempt. Every greedy and
    seeded request gets the tokens of the portable path with a page of max_len per slot, once."""
    requests = [dataclasses.replace(request, max_new_tokens=56) for request in mixed[0]]
    expected = {result.id: result for result in mixed_engine(model).generate(requests)}
    mesh = mesh_of((2, 2, 1))
    model = from_pretrained(checkpoint, dtype=jnp.float32, mesh=mesh)
    engine = mixed_engine(model, mesh=mesh, page_size=8, kv_pages=24, prefix_caching=True,
                          attention_implementation="tpu_kernel")  # fmt: skip
    results, _ = streamed(engine, requests)
    assert results == expected
    assert engine.preemptions > 0
