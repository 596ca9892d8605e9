"""Log-probabilities: those of generated and prompt tokens equal transformers' float32 log-softmax, prompts
prefilled in pieces on a 2x2x2 mesh; the top lists are sorted and rank the chosen token."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_config
from reference import load_reference

from gptoss_dist import from_pretrained
from gptoss_dist.engine import Engine, Request, Result
from gptoss_dist.sharding import MESH_AXES, make_mesh

PROMPT_LENGTHS = (29, 17)
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def reference(small_checkpoint):
    return load_reference(small_checkpoint)


def reference_logprobs(reference, tokens: list[int]) -> np.ndarray:
    """transformers' log-softmax [T, V] of the logits of `tokens`, in float32."""
    import torch

    with torch.no_grad():
        logits = reference(torch.tensor([tokens])).logits[0].float()
        return torch.log_softmax(logits, dim=-1).numpy()


def scored_requests() -> list[Request]:
    """A greedy request and a sampled one that score their tokens and prompts."""
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 128, n).tolist() for n in PROMPT_LENGTHS]
    scored = {"logprobs": True, "prompt_logprobs": True, "max_new_tokens": 5}
    return [
        Request(prompts[0], top_logprobs=5, id="greedy", **scored),
        Request(prompts[1], temperature=1.5, seed=3, top_logprobs=20, id="sampled", **scored),
    ]


def check_against(reference, request: Request, result: Result) -> None:
    expected = reference_logprobs(reference, [*request.prompt, *result.tokens])
    prompt = request.prompt
    scored, logprobs = zip(*result.prompt_logprobs, strict=True)
    assert list(scored) == prompt[1:]
    expected_prompt = [expected[i, prompt[i + 1]] for i in range(len(prompt) - 1)]
    np.testing.assert_allclose(logprobs, expected_prompt, rtol=0, atol=TOLERANCE)
    assert len(result.logprobs) == len(result.tokens)
    for step, (token, scores) in enumerate(zip(result.tokens, result.logprobs, strict=True)):
        row = expected[len(prompt) - 1 + step]
        assert abs(scores.logprob - row[token]) <= TOLERANCE
        assert scores.rank == 1 + np.sum(row > row[token])
        top_tokens, top_logprobs = zip(*scores.top, strict=True)
        assert len(top_tokens) == request.top_logprobs
        assert list(top_tokens) == np.argsort(-row, kind="stable")[: request.top_logprobs].tolist()
        assert list(top_logprobs) == sorted(top_logprobs, reverse=True)
        np.testing.assert_allclose(top_logprobs, row[list(top_tokens)], rtol=0, atol=TOLERANCE)
        if scores.rank <= request.top_logprobs:
            assert top_tokens[scores.rank - 1] == token


def test_logprobs_equal_transformers_across_prompt_pieces_on_a_mesh(small_checkpoint, reference):
    """Prefill calls of two rows of 8 tokens on a 2x2x2 mesh: the prompts go in 4 and 3 pieces. Eight slots: a
    decode step scores each slot's token on its own device. (The engine runs the same code unsharded.)"""
    mesh = make_mesh(dict(zip(MESH_AXES, (2, 2, 2))), small_config(), jax.devices()[:8])
    model = from_pretrained(small_checkpoint, dtype=jnp.float32, mesh=mesh)
    engine = Engine(model, mesh, max_slots=8, max_len=64, steps_per_call=4, prefill_tokens=16, min_prefill_len=8)
    requests = scored_requests()
    results = engine.generate(requests)
    assert set(engine.prefill_shapes) == {(2, 8)} and sum(engine.prefill_shapes.values()) >= 4
    assert max(scores.rank for scores in results[1].logprobs) > 1  # sampled: not always the most likely token
    for request, result in zip(requests, results, strict=True):
        check_against(reference, request, result)


def test_top_logprobs_out_of_range_are_refused(small_checkpoint):
    engine = Engine(from_pretrained(small_checkpoint, dtype=jnp.float32), max_slots=1, max_len=16)
    for request in (Request([1], logprobs=True, top_logprobs=21), Request([1], top_logprobs=2)):
        with pytest.raises(ValueError, match=r"top_logprobs must be in \[0, 20\], and 0 without logprobs"):
            engine.validate(request)
