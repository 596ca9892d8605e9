"""Choosing the next token per request: greedy, or sampled with temperature, top-k and top-p.

Each row's choice depends only on its own logits, its settings and a key derived from (seed, index of the
token being generated), so a request samples the same tokens whatever else shares its batch, whichever slot
it sits in and however the mesh is laid out.

Log-probabilities are the model's own: the float32 log-softmax of the raw logits, before temperature, top-k and
top-p (vLLM's default "raw logprobs").
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

MAX_TOP_LOGPROBS = 20  # the most likely tokens that `token_scores` lists per token


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TokenScores:
    """Per chosen token: its log-probability, its rank among all tokens (1: the most likely) and the
    MAX_TOP_LOGPROBS most likely tokens with their log-probabilities, most likely first."""

    logprob: jax.Array  # [...] float32
    rank: jax.Array  # [...] int32
    top_tokens: jax.Array  # [..., MAX_TOP_LOGPROBS] int32
    top_logprobs: jax.Array  # [..., MAX_TOP_LOGPROBS] float32


def logprobs_of(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """The log-probabilities [...] of `tokens` [...] under float32 logits [..., V], without the whole
    log-softmax."""
    chosen = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    return chosen - jax.nn.logsumexp(logits, axis=-1)


def token_scores(logits: jax.Array, tokens: jax.Array) -> TokenScores:
    """The scores of `tokens` [B] chosen from float32 logits [B, V]."""
    top_logits, top_tokens = jax.lax.top_k(logits, MAX_TOP_LOGPROBS)
    chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)
    normalizer = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    return TokenScores(
        logprob=(chosen - normalizer)[:, 0],
        rank=1 + jnp.sum(logits > chosen, axis=-1, dtype=jnp.int32),
        top_tokens=top_tokens.astype(jnp.int32),
        top_logprobs=top_logits - normalizer,
    )


def token_keys(seeds: jax.Array, steps: jax.Array) -> jax.Array:
    """One PRNG key per row for generating token number `steps` of a request seeded `seeds`."""
    return jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step))(seeds, steps)


def filtered_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Logits [B, V] with everything outside each row's top-k and then top-p nucleus set to -inf.

    top_k <= 0 and top_p >= 1 disable the filters. The nucleus is the smallest set of most likely tokens
    whose probability reaches top_p (transformers' order: top-k first, then top-p within it).
    """
    vocab = logits.shape[-1]
    descending = -jnp.sort(-logits, axis=-1)
    kth_largest = jnp.take_along_axis(descending, jnp.clip(top_k - 1, 0, vocab - 1)[:, None], axis=-1)
    k_floor = jnp.where(top_k[:, None] > 0, kth_largest, -jnp.inf)
    descending = jnp.where(descending >= k_floor, descending, -jnp.inf)
    probs = jax.nn.softmax(descending, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    in_nucleus = (mass_before < top_p[:, None]) | (jnp.arange(vocab) == 0)
    p_floor = jnp.min(jnp.where(in_nucleus, descending, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= jnp.maximum(k_floor, p_floor), logits, -jnp.inf)


def sample(
    logits: jax.Array,
    keys: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
) -> jax.Array:
    """The next token [B] from float32 logits [B, V]: argmax where temperature is 0, else a draw (Gumbel-max)
    from softmax(logits / temperature) restricted by top-k and top-p."""
    greedy = jnp.argmax(logits, axis=-1)

    def draw() -> jax.Array:
        scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        noise = jax.vmap(lambda key: jax.random.gumbel(key, logits.shape[-1:], logits.dtype))(keys)
        return jnp.argmax(filtered_logits(scaled, top_k, top_p) + noise, axis=-1)

    # Sorting the vocabulary costs time: skip it when every row is greedy.
    drawn = jax.lax.cond(jnp.any(temperature > 0), draw, lambda: greedy)
    return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)
