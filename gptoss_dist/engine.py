"""Batched decoding: a paged KV cache, prefill in bucketed pieces of bounded size, many decode steps per host
round trip, and continuous batching (a slot whose sequence ends takes the next waiting request).

The cache keeps, per layer, keys and values side by side in pages [pages, kv_heads, page, 2 * head_dim]
(`model.LayerCache`).
Full-attention layers share one pool of `kv_pages` pages of `page_size` positions: a sequence takes pages as it
grows (its page table says which) and gives them back when it ends, so the pool's memory follows the live
tokens, and decoding reads only the pages up to each sequence's length. By default a page holds `max_len`
positions and the pool one page per slot: the contiguous cache of every slot at full length. Sliding layers
keep only their window per slot, as a ring (position p at index p % window), which for GPT-OSS's 128-key
window and long contexts halves the cache.

A request is admitted when a slot and the pages for its prompt are free. Where the mesh splits the slots and
the pool over its `data` axis, a slot's pages come from its own shard's part of the pool. Where a shard's pages
run short while decoding, its most recently admitted sequence gives its pages back and waits to run again: its
prompt and the tokens it generated are prefilled once more, and it goes on with the same sampling keys, so its
output does not change; it keeps the scores it has (neither its prompt nor its generated tokens are scored
again).

With `prefix_caching`, the pages a prefill call fills with a full page of a context are keyed by the hash of
all the tokens up to the page's end (as vLLM keys its blocks). A sequence whose context starts with cached
pages maps them read-only into its page table and prefills only the rest; pages count the slots that hold
them, and cached pages no slot holds stay until the pool needs room, the least recently used evicted first. A
request's n samples share their prompt's full pages and their prefill this way. The keys of a token depend only
on the tokens up to it, so a request's tokens do not depend on whether its prefix was cached. The sliding
layers then keep their keys in the pool too, as the full-attention layers do, since a sequence that starts
after a cached prefix needs the window of keys before it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_dist.attention import DEFAULT_BLOCK
from gptoss_dist.config import ModelConfig
from gptoss_dist.model import (
    CACHE_AXES,
    GptOss,
    LayerCache,
    Span,
    cache_length,
    cache_shape,
    check_implementation,
)
from gptoss_dist.sampling import (
    MAX_TOP_LOGPROBS,
    TokenScores,
    logprobs_of,
    sample,
    token_keys,
    token_scores,
)
from gptoss_dist.sharding import constrain, logical_to_spec, mesh_sizes
from gptoss_dist.tokenizer import STOP_TOKENS

DEFAULT_STOP_TOKENS = tuple(STOP_TOKENS.values())
MAX_REQUEST_STOP_TOKENS = 16  # stop token ids a request may add to the engine's
MAX_SAMPLES = 64  # completions one request may ask for (`Request.n`)
SLOT_AXES = ("batch",)


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation: prompt token ids and how to continue them. `stop` adds stop token ids to the engine's.
    `n` asks for n completions (samples) of the prompt: sample i is seeded `seed + i`, so sample 0 is the
    completion of the same request with n=1; with prefix caching the samples share the prompt's full pages and
    their prefill (each prefills the rest of the prompt, at most a page). `logprobs` scores each generated token
    (with its `top_logprobs` most likely alternatives), `prompt_logprobs` each prompt token after the first (see
    `sampling`: the model's log-probabilities, before sampling); each sample has its own."""

    prompt: Sequence[int]
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: Sequence[int] = ()
    id: Any = None
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: bool = False


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability, its rank among all tokens (1: the most likely), and the request's
    `top_logprobs` most likely tokens as (token id, log-probability), most likely first."""

    logprob: float
    rank: int
    top: list[tuple[int, float]]


@dataclasses.dataclass
class Result:
    """A finished sample of a request (`index`, from 0; a request of n=1 has one): its generated tokens (a final
    stop token included) and why it ended: "stop" (a stop token), "length" (max_new_tokens) or "context" (the
    engine's max_len). If the request asked for them, the scores of its tokens (one each) and its prompt's
    tokens after the first with their log-probabilities, as (token id, log-probability)."""

    id: Any
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    index: int = 0
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[tuple[int, float]] | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


@dataclasses.dataclass
class Update:
    """A sample's progress in one engine call: the tokens that sample `index` of the request generated since
    its last update and, once it has ended, its result (whose tokens are all of its updates' tokens)."""

    request: Request
    tokens: list[int]
    result: Result | None = None
    index: int = 0


# ------------------------------------------------------------------------------------------- KV cache


def _bytes_per_position(cfg: ModelConfig, dtype) -> int:
    return 2 * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize


def cache_bytes_per_sequence(cfg: ModelConfig, max_len: int, dtype=jnp.bfloat16) -> int:
    """Bytes of keys and values that one sequence of up to `max_len` tokens holds in the cache."""
    return _bytes_per_position(cfg, dtype) * sum(cache_length(cfg, layer, max_len) for layer in range(cfg.num_layers))


def cache_bytes(
    cfg: ModelConfig, max_slots: int, max_len: int, pool_tokens: int, dtype=jnp.bfloat16, rings: bool = True
) -> int:
    """Bytes of the whole cache: a pool of `pool_tokens` positions in each full-attention layer, and in each
    sliding layer each slot's window (`rings`) or a pool too (with prefix caching)."""
    lengths = (max_slots * cache_length(cfg, layer, max_len) if rings and cfg.window(layer) else pool_tokens
               for layer in range(cfg.num_layers))  # fmt: skip
    return _bytes_per_position(cfg, dtype) * sum(lengths)


def page_pool(max_slots: int, max_len: int, page_size: int = 0, kv_pages: int = 0, data: int = 1) -> tuple[int, int]:
    """(page_size, kv_pages) of the full-attention layers' pool, 0 meaning the default: a page of `max_len`
    positions, and as many pages as every slot needs at full length. ValueError, naming the setting, where the
    mesh's `data` shards do not divide the slots or the pages, the page size does not divide max_len, or a
    shard's pages (each slot takes its pages from its own shard's, `_PagePool`) cannot hold one sequence of
    max_len."""
    if max_slots % data:
        raise ValueError(f"max_slots={max_slots} must be a multiple of the mesh's data axis ({data})")
    if page_size < 0 or kv_pages < 0:
        raise ValueError(f"page_size ({page_size}) and kv_pages ({kv_pages}) must be >= 0 (0: the default)")
    page_size = page_size or max_len
    if max_len % page_size:
        raise ValueError(f"page_size={page_size} must divide max_len={max_len}")
    per_sequence = max_len // page_size
    kv_pages = kv_pages or max_slots * per_sequence
    if kv_pages % data:
        raise ValueError(f"kv_pages={kv_pages} must be a multiple of the mesh's data axis ({data})")
    if kv_pages // data < per_sequence:
        shard = f", {kv_pages // data} in each of the mesh's {data} data shards," if data > 1 else ""
        raise ValueError(f"kv_pages={kv_pages}{shard} cannot hold one sequence of max_len={max_len}, which takes "
                         f"{per_sequence} pages of page_size={page_size}: raise kv_pages or lower max_len")  # fmt: skip
    return page_size, kv_pages


# -------------------------------------------------------------------------------------------- slots


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Slots:
    """What the device keeps per slot between steps: the cache, the token to feed next, counts, settings."""

    cache: list[LayerCache]  # sliding layers: a ring per slot; full-attention layers: the pool of pages
    token: jax.Array  # [B] int32: the last generated token, not yet in the cache
    length: jax.Array  # [B] int32: tokens in the cache (the position `token` goes to)
    generated: jax.Array  # [B] int32: tokens generated so far
    active: jax.Array  # [B] bool
    max_new: jax.Array  # [B] int32
    temperature: jax.Array  # [B] float32
    top_k: jax.Array  # [B] int32
    top_p: jax.Array  # [B] float32
    seed: jax.Array  # [B] uint32
    stop: jax.Array  # [B, S] int32, padded with -1


# Slots fields set from a request's field at admission, with their dtypes.
REQUEST_SETTINGS = {
    "max_new": ("max_new_tokens", np.int32),
    "temperature": ("temperature", np.float32),
    "top_k": ("top_k", np.int32),
    "top_p": ("top_p", np.float32),
    "seed": ("seed", np.uint32),
}


def _finished(slots: Slots, max_len: int) -> jax.Array:
    """Slots whose last token ends them: a stop token, max_new_tokens, or a full context."""
    stopped = jnp.any(slots.token[:, None] == slots.stop, axis=-1)
    return stopped | (slots.generated >= slots.max_new) | (slots.length + 1 >= max_len)


def _next_tokens(
    model: GptOss, slots: Slots, hidden: jax.Array, logprobs: bool
) -> tuple[jax.Array, TokenScores | None]:
    """The next token of each slot, and with `logprobs` their scores. The logits, split over the vocabulary, are
    re-split over their rows (`sampling_rows`): each device sorts, draws and scores whole-vocabulary rows for its
    share of the slots only. Without it the TPU compiler gathers every row onto every device: a 2-layer call of the
    20B's widths at 960 slots on v6e:2x4 held 3.07 GiB of temporaries a chip, 0.38 GiB with it (BENCHMARKS.md)."""
    logits = constrain(model.logits(hidden)[:, -1], ("sampling_rows", None))
    keys = token_keys(slots.seed, slots.generated)
    tokens = sample(logits, keys, slots.temperature, slots.top_k, slots.top_p)
    return tokens, token_scores(logits, tokens) if logprobs else None


def prefill(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    slots: Slots,
    tokens: jax.Array,
    first: jax.Array,
    count: jax.Array,
    targets: jax.Array,
    last: jax.Array,
    resumed: jax.Array,
    next_token: jax.Array,
    following: jax.Array,
    settings: dict[str, jax.Array],
    pages: jax.Array,
    *,
    max_len: int,
    attention_block: int,
    logprobs: bool = False,
    prompt_logprobs: bool = False,
) -> tuple[Slots, jax.Array, jax.Array, TokenScores | None, jax.Array | None]:
    """Runs a piece of each of n prompts into slots `targets` [n] (out of range: a padding row): `count` [n]
    tokens [n, T] (right-padded) at positions `first` [n] onwards, which attend to their slot's cache (the
    pool through the page table `pages` [B, W]) and to each other. Rows whose piece is the prompt's `last` [n]
    become active: a new sequence samples its first token; one that had generated `resumed` [n] tokens before
    it was preempted (its prompt then ends with all but the last of them) goes on from `next_token` [n], the
    last. The others stay inactive until their next piece. Returns the slots, the first tokens [n] (sampled
    even where `resumed`), which slots are active [B], with `logprobs` the first tokens' scores, and with
    `prompt_logprobs` the log-probabilities [n, T] of `following` [n, T], the prompt token after each position
    (-1: none), from the piece's logits (never more than a piece's); all but the slots replicated so that every
    process can read them. Attention takes the portable path: the decode kernel reads a slot's pages on its own
    data shard, and a row here may hold any slot's piece."""
    model = nnx.merge(graphdef, params)
    span = Span(first=first, start=jnp.zeros_like(first), end=count, slot=targets,
                pages=jnp.take(pages, targets, axis=0, mode="clip"))  # fmt: skip
    hidden, cache = model.hidden_states(tokens, span, slots.cache, attention_block=attention_block,
                                        attention_implementation="blockwise")  # fmt: skip
    final = jnp.take_along_axis(hidden, jnp.maximum(count - 1, 0)[:, None, None], axis=1)
    zeros = jnp.zeros_like(count)
    new = Slots(cache=None, token=zeros, length=first + count, generated=zeros, active=last, **settings)
    sampled, scores = _next_tokens(model, new, final, logprobs)
    token = jnp.where(resumed > 0, next_token, sampled)
    new = dataclasses.replace(new, token=token, generated=jnp.where(last, jnp.maximum(resumed, 1), 0))
    new = dataclasses.replace(new, active=last & ~_finished(new, max_len))

    def scatter(old, update):
        return old.at[targets].set(update, mode="drop")

    merged = jax.tree.map(scatter, dataclasses.replace(slots, cache=None), new)
    prompt_scores = logprobs_of(model.logits(hidden), jnp.maximum(following, 0)) if prompt_logprobs else None
    outputs = jax.tree.map(replicated, (sampled, merged.active, scores, prompt_scores))
    return in_slot_layout(dataclasses.replace(merged, cache=cache)), *outputs


def decode(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    slots: Slots,
    pages: jax.Array,
    *,
    steps: int,
    max_len: int,
    attention_block: int,
    attention_implementation: str,
    logprobs: bool = False,
) -> tuple[Slots, jax.Array, jax.Array, jax.Array, TokenScores | None]:
    """`steps` decode steps for every slot in one call, slot b's pool pages being `pages[b]`; inactive slots
    neither change nor write to the cache. Returns the slots, the tokens [steps, B], which of them were
    generated by an active slot [steps, B], which slots are still active [B] and with `logprobs` the tokens'
    scores [steps, B, ...], all but the slots replicated."""
    model = nnx.merge(graphdef, params)

    def step(slots: Slots, _):
        live = slots.active
        span = Span(first=slots.length, start=jnp.zeros_like(slots.length), end=live.astype(jnp.int32), pages=pages)
        hidden, cache = model.hidden_states(slots.token[:, None], span, slots.cache, attention_block=attention_block,
                                            attention_implementation=attention_implementation)  # fmt: skip
        token, scores = _next_tokens(model, slots, hidden, logprobs)
        slots = dataclasses.replace(
            slots,
            cache=cache,
            token=jnp.where(live, token, slots.token),
            length=slots.length + live,
            generated=slots.generated + live,
        )
        slots = dataclasses.replace(slots, active=live & ~_finished(slots, max_len))
        return slots, (token, live, scores)

    slots, (tokens, emitted, scores) = jax.lax.scan(step, slots, length=steps)
    return in_slot_layout(slots), *jax.tree.map(replicated, (tokens, emitted, slots.active, scores))


def deactivate(slots: Slots, slot: jax.Array) -> Slots:
    """The slots with `slot` stopped: it neither changes nor writes to the cache until it is filled again."""
    return in_slot_layout(dataclasses.replace(slots, active=slots.active.at[slot].set(False)))


def in_slot_layout(slots: Slots) -> Slots:
    """The slots with each per-slot array pinned to its batch sharding, as the engine creates them. Left to XLA,
    an array that a call also returns replicated (`active`) comes back replicated, and the next call compiles
    once more for it."""
    per_slot = {field.name: getattr(slots, field.name) for field in dataclasses.fields(slots) if field.name != "cache"}
    pinned = {name: constrain(x, (*SLOT_AXES, *(None,) * (x.ndim - 1))) for name, x in per_slot.items()}
    return dataclasses.replace(slots, **pinned)


def replicated(x: jax.Array) -> jax.Array:
    """x on every device, so that each process holds all of it (under a mesh; else x)."""
    return constrain(x, (None,) * x.ndim)


@dataclasses.dataclass(frozen=True)
class _Blank:
    """An array the engine creates: its shape, dtype, logical axes and fill value."""

    shape: tuple[int, ...]
    dtype: Any
    axes: tuple[str | None, ...]
    fill: int | float = 0


@functools.lru_cache(maxsize=None)
def _full(shape: tuple[int, ...], dtype, fill, sharding) -> Callable[[], jax.Array]:
    """A compiled maker of a filled array in `sharding`, kept so that each run does not compile it again."""
    return jax.jit(lambda: jnp.full(shape, fill, dtype), out_shardings=sharding)


# Compiled once per model structure, shape and the scores it gives, shared by every engine (a call that scores
# nothing compiles and runs no scoring); the slots are donated.
_prefill_jit = jax.jit(
    prefill,
    static_argnames=("graphdef", "max_len", "attention_block", "logprobs", "prompt_logprobs"),
    donate_argnames=("slots",),
)
_decode_jit = jax.jit(
    decode,
    static_argnames=("graphdef", "steps", "max_len", "attention_block", "attention_implementation", "logprobs"),
    donate_argnames=("slots",),
)
_deactivate_jit = jax.jit(deactivate, donate_argnames=("slots",))

# ------------------------------------------------------------------------------------------- engine


def _any_asks_logprobs(sequences: dict[int, _Sequence]) -> bool:
    """Whether any of `sequences` asks for its tokens' scores: then a call scores the tokens it samples."""
    return any(sequence.request.logprobs for sequence in sequences.values())


def _token_logprob(scores: TokenScores, index: tuple[int, ...], top: int) -> TokenLogprob:
    """The scores of the token at `index` in host `scores`, with its `top` most likely alternatives."""
    alternatives = zip(scores.top_tokens[index][:top].tolist(), scores.top_logprobs[index][:top].tolist())
    return TokenLogprob(float(scores.logprob[index]), int(scores.rank[index]), list(alternatives))


def _buckets(smallest: int, largest: int) -> list[int]:
    """smallest, 2*smallest, 4*smallest, ... below `largest`, then `largest`."""
    sizes = [smallest * 2**i for i in range(max(0, math.ceil(math.log2(largest / smallest))))]
    return [s for s in sizes if s < largest] + [largest]


def _fit(buckets: list[int], size: int) -> int:
    return next(b for b in buckets if b >= size)


@dataclasses.dataclass
class _Sequence:
    """A request's sample and its progress: the tokens to prefill (its prompt; after a preemption, its prompt and
    all but the last token it generated), how many of them are in the cache, the tokens generated so far and
    the scores it asked for."""

    request: Request
    context: list[int]
    index: int = 0  # the sample's, seeded request.seed + index
    prefilled: int = 0
    generated: list[int] = dataclasses.field(default_factory=list)
    unread: int = 0  # tokens that calls not read yet may have generated
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    prompt_logprobs: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    keys: list[bytes] = dataclasses.field(default_factory=list)  # of its context's full pages, with prefix caching

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.context)

    def may_go_on(self, max_len: int) -> bool:
        """Whether the sequence may be active after the calls not read yet: a stop token may end it sooner,
        but its token budget and the context end it for sure."""
        generated = len(self.generated) + self.unread
        return generated < self.request.max_new_tokens and len(self.request.prompt) + generated < max_len

    def cached(self) -> int:
        """The most tokens the cache may hold of it once the calls not read yet are done: all but the last
        generated one, which goes in next."""
        return len(self.request.prompt) + max(len(self.generated) + self.unread - 1, 0)

    def preempted(self) -> _Sequence:
        """The sequence to run again from nothing in the cache (once every call it was in has been read), with
        the tokens and scores it has: its prompt is not scored again, nor are the tokens it generated."""
        return _Sequence(self.request, [*self.request.prompt, *self.generated[:-1]], self.index,
                         generated=self.generated, logprobs=self.logprobs,
                         prompt_logprobs=self.prompt_logprobs)  # fmt: skip


class _PagePool:
    """The host's account of the pool: free pages, and each slot's pages in its row of the page table. With
    prefix caching, a page that holds a full page of some context is keyed by the hash of all the tokens up to
    its end (`_page_keys`): slots whose contexts start alike map it read-only (it counts them), and once none
    does it stays cached until the pool needs room, the least recently used first.

    Where the mesh splits the slots and the pool over `shards` (its `data` axis), each slot takes its pages from
    its own shard's part of the pool, and maps cached pages of that part only, so that a decode step reads each
    sequence's keys on the devices that hold its slot (the TPU kernel reads only its devices' part)."""

    def __init__(self, pages: int, page_size: int, slots: int, per_sequence: int, shards: int = 1):
        self.page_size = page_size
        self.slots_per_shard, part = slots // shards, pages // shards
        # taken from the end: each part's first page first
        self.free = [list(range((s + 1) * part - 1, s * part - 1, -1)) for s in range(shards)]
        self.held: dict[int, list[int]] = {}
        self.table = np.zeros((slots, per_sequence), np.int32)
        self.users: Counter[int] = Counter()  # slots holding each page
        self.cached: list[dict[bytes, int]] = [{} for _ in range(shards)]  # the page of each key, by shard
        self.key_of: dict[int, bytes] = {}
        # cached pages no slot holds, least recently used first, by shard
        self.idle: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(shards)]

    def shard(self, slot: int) -> int:
        return slot // self.slots_per_shard

    def cached_for(self, slot: int) -> dict[bytes, int]:
        """The cached pages that `slot` may map, by key."""
        return self.cached[self.shard(slot)]

    def available(self, shard: int) -> int:
        return len(self.free[shard]) + len(self.idle[shard])

    def missing(self, slot: int, tokens: int) -> int:
        """Pages that `slot` lacks for `tokens` tokens."""
        return max(-(-tokens // self.page_size) - len(self.held.get(slot, [])), 0)

    def has_room(self, needs: dict[int, int]) -> bool:
        """Whether the free (or only cached) pages of each shard cover `needs` (tokens by slot)."""
        wanted = Counter()
        for slot, tokens in needs.items():
            wanted[self.shard(slot)] += self.missing(slot, tokens)
        return all(count <= self.available(shard) for shard, count in wanted.items())

    def take(self, slot: int, tokens: int) -> bool:
        """Gives `slot` the pages that `tokens` tokens need, if its shard has them (evicting cached pages no slot
        holds, least recently used first); says whether it did."""
        shard, missing = self.shard(slot), self.missing(slot, tokens)
        if missing > self.available(shard):
            return False
        for _ in range(missing):
            if self.free[shard]:
                page = self.free[shard].pop()
            else:
                page, _ = self.idle[shard].popitem(last=False)
                del self.cached[shard][self.key_of.pop(page)]
            self._hold(slot, page)
        return True

    def share(self, slot: int, keys: Sequence[bytes]) -> int:
        """Maps into the empty table of `slot` the cached pages of the longest run of `keys` from the first;
        returns how many."""
        cached = self.cached_for(slot)
        for key in keys:
            if key not in cached:
                break
            self._hold(slot, cached[key])
        return len(self.held.get(slot, []))

    def publish(self, slot: int, keys: Sequence[bytes]) -> None:
        """Caches the first pages of `slot` under `keys` (of the full pages it has written), where no page holds
        their tokens yet."""
        cached = self.cached_for(slot)
        for page, key in zip(self.held[slot], keys):
            if key not in cached and page not in self.key_of:
                cached[key], self.key_of[page] = page, key

    def release(self, slot: int) -> None:
        """Takes back the pages of `slot`: those no other slot holds become free, or, if cached, idle (the last
        page first in line for eviction)."""
        shard = self.shard(slot)
        for page in reversed(self.held.pop(slot, [])):
            self.users[page] -= 1
            if self.users[page]:
                continue
            del self.users[page]
            if page in self.key_of:
                self.idle[shard][page] = None
            else:
                self.free[shard].append(page)

    def _hold(self, slot: int, page: int) -> None:
        held = self.held.setdefault(slot, [])
        self.table[slot, len(held)] = page
        held.append(page)
        self.users[page] += 1
        self.idle[self.shard(slot)].pop(page, None)


def _page_keys(tokens: Sequence[int], page_size: int) -> list[bytes]:
    """The key of each full page of `tokens`: the hash of all the tokens up to the page's end (chained)."""
    keys, digest = [], b""
    data = np.asarray(tokens, np.int32)
    for end in range(page_size, len(tokens) + 1, page_size):
        digest = hashlib.sha256(digest + data[end - page_size : end].tobytes()).digest()
        keys.append(digest)
    return keys


class Engine:
    """Generates for a stream of requests with `max_slots` sequences in flight, each of at most `max_len`
    tokens (prompt and completion). `steps_per_call` decode steps run per host round trip. The full-attention
    layers keep their keys in a pool of `kv_pages` pages of `page_size` positions (see `page_pool` for the
    defaults): a request waits for a slot and the pages of its prompt, and where the pool runs short the most
    recently admitted sequence is preempted and later recomputed, with the same output. With `prefix_caching`,
    requests share the pages of their prompts' common prefixes (see the module's docstring).

    Prompts are prefilled in calls of about `prefill_tokens` (padded) tokens, which bounds prefill memory: short
    prompts share a call, and a longer prompt is cut into pieces that each attend to what the cache holds of it.
    While some slots are decoding, prefill calls alternate with decode calls, so a long prompt does not stall
    the batch. Attention runs in blocks of `attention_block` queries and keys; a decode step reads the pool as
    `attention_implementation` says (`model.ATTENTION_IMPLEMENTATIONS`: on TPUs by default a kernel that reads
    each sequence's own live pages). With `overlap`, the host reads a call's tokens while the next call runs."""

    def __init__(
        self,
        model: GptOss,
        mesh: jax.sharding.Mesh | None = None,
        *,
        max_slots: int,
        max_len: int,
        steps_per_call: int = 8,
        stop_tokens: Sequence[int] = DEFAULT_STOP_TOKENS,
        min_prefill_len: int = 16,
        prefill_tokens: int = 8192,
        attention_block: int = DEFAULT_BLOCK,
        attention_implementation: str = "auto",
        page_size: int = 0,
        kv_pages: int = 0,
        prefix_caching: bool = False,
        overlap: bool = True,
    ):
        self.config: ModelConfig = model.config
        self.config.check_max_len(max_len)
        self.mesh = mesh
        self.max_slots, self.max_len, self.steps_per_call = max_slots, max_len, steps_per_call
        self.prefill_tokens, self.overlap = prefill_tokens, overlap
        self.stop_tokens = tuple(stop_tokens)
        self.stop_width = len(self.stop_tokens) + MAX_REQUEST_STOP_TOKENS
        data = mesh_sizes(mesh)["data"] if mesh is not None else 1
        self.page_size, self.kv_pages = page_pool(max_slots, max_len, page_size, kv_pages, data)
        self.data_shards = data
        self.prefix_caching = prefix_caching
        self.row_buckets = _buckets(data, max_slots)
        # the longest piece of a prompt that one call runs: calls have at least one row per data shard
        self.piece_len = min(max(1, prefill_tokens // self.row_buckets[0]), max_len)
        self.length_buckets = _buckets(min(min_prefill_len, self.piece_len), self.piece_len)
        self.graphdef, self.params = nnx.split(model)
        self.dtype = model.compute_dtype
        check_implementation("attention", attention_implementation)
        self._static = dict(graphdef=self.graphdef, max_len=max_len, attention_block=attention_block)
        self._decode_static = dict(steps=steps_per_call, attention_implementation=attention_implementation)
        self._prefill = partial(_prefill_jit, **self._static)
        self._decode = partial(_decode_jit, **self._static, **self._decode_static)
        self.slot_steps = 0  # decode steps x slots spent, for measuring batching efficiency
        self.preemptions = 0  # sequences that gave their pages back to be recomputed later
        self.prefilled_tokens = 0  # context tokens run by prefill calls (those of cached prefixes are not)
        self.prefill_shapes: Counter[tuple[int, int]] = Counter()  # (rows, width) of each prefill call run

    def cache_bytes_per_sequence(self) -> int:
        return cache_bytes_per_sequence(self.config, self.max_len, self.dtype)

    def _sharding(self, shape: tuple[int, ...], axes: Sequence[str | None]) -> jax.sharding.Sharding:
        if self.mesh is None:
            # committed to the device the calls run on, as their outputs are: an uncommitted first input would
            # make jit compile each call once more when it meets the committed slots of an earlier call
            return jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.sharding.NamedSharding(self.mesh, logical_to_spec(axes, shape, mesh_sizes(self.mesh)))

    def _slot_layout(self) -> Slots:
        """Each Slots array as a `_Blank`: sliding layers' caches hold only their window."""
        cfg, count = self.config, self.max_slots
        pool, rings = (self.kv_pages, self.page_size), not self.prefix_caching
        cache = []
        for layer in range(cfg.num_layers):
            shape = cache_shape(cfg, layer, count, self.max_len, pool, rings)
            ring = rings and cfg.window(layer) is not None
            cache.append(LayerCache(_Blank(shape, self.dtype, CACHE_AXES), ring=ring))
        per_slot = partial(_Blank, (count,), axes=SLOT_AXES)
        return Slots(
            cache=cache, token=per_slot(jnp.int32), length=per_slot(jnp.int32), generated=per_slot(jnp.int32),
            active=per_slot(jnp.bool_), max_new=per_slot(jnp.int32), temperature=per_slot(jnp.float32),
            top_k=per_slot(jnp.int32), top_p=per_slot(jnp.float32, fill=1.0), seed=per_slot(jnp.uint32),
            stop=_Blank((count, self.stop_width), jnp.int32, (*SLOT_AXES, None), fill=-1),
        )  # fmt: skip

    def empty_slots(self) -> Slots:
        """Slots with an empty cache, each array created on the devices in its sharding (never whole on one)."""
        return jax.tree.map(
            lambda b: _full(b.shape, jnp.dtype(b.dtype), b.fill, self._sharding(b.shape, b.axes))(), self._slot_layout()
        )

    def abstract_slots(self) -> Slots:
        """The slots' shapes, dtypes and shardings, without allocating them (to compile without running)."""
        return jax.tree.map(
            lambda b: jax.ShapeDtypeStruct(b.shape, b.dtype, sharding=self._sharding(b.shape, b.axes)),
            self._slot_layout(),
        )

    def lower_prefill(self, rows: int, width: int) -> jax.stages.Lowered:
        """The prefill call of `rows` prompt pieces of `width` tokens, lowered for this engine's mesh from
        abstract arguments: it reads no weights and allocates no cache, so the engine's model may be abstract."""
        per_row = partial(self._abstract_input, (rows,))
        settings = {name: per_row(dtype) for name, (_, dtype) in REQUEST_SETTINGS.items()}
        settings["stop"] = self._abstract_input((rows, self.stop_width), np.int32)
        with self._mesh_context():
            return _prefill_jit.lower(
                **self._static, params=self.params, slots=self.abstract_slots(),
                tokens=self._abstract_input((rows, width), np.int32), first=per_row(np.int32),
                count=per_row(np.int32), targets=per_row(np.int32), last=per_row(bool), resumed=per_row(np.int32),
                next_token=per_row(np.int32), following=self._abstract_input((rows, width), np.int32),
                settings=settings, pages=self._abstract_pages(),
            )  # fmt: skip

    def prefill_call_shapes(self) -> list[tuple[int, int]]:
        """Every (rows, width) a prefill call may take: the fewest rows at any width (one prompt's piece), or
        more rows whose padded tokens stay within `prefill_tokens` (`_pieces`)."""
        fewest = self.row_buckets[0]
        return [(rows, width) for rows in self.row_buckets for width in self.length_buckets
                if rows == fewest or rows * width <= self.prefill_tokens]  # fmt: skip

    def lower_decode(self) -> jax.stages.Lowered:
        """The decode call, lowered like `lower_prefill`."""
        with self._mesh_context():
            return _decode_jit.lower(**self._static, **self._decode_static, params=self.params,
                                     slots=self.abstract_slots(), pages=self._abstract_pages())  # fmt: skip

    def _abstract_pages(self) -> jax.ShapeDtypeStruct:
        return self._abstract_input((self.max_slots, self.max_len // self.page_size), np.int32)

    def _abstract_input(self, shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=self._sharding(shape, (None,) * len(shape)))

    def _mesh_context(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def validate(self, request: Request) -> None:
        """Raises ValueError, naming the request, for one that cannot run."""
        name = f"request {request.id!r}" if request.id is not None else "request"
        if not request.prompt:
            raise ValueError(f"{name}: empty prompt")
        if len(request.prompt) >= self.max_len:
            raise ValueError(
                f"{name}: prompt of {len(request.prompt)} tokens leaves no room in a context of {self.max_len}"
            )
        if min(request.prompt) < 0 or max(request.prompt) >= self.config.vocab_size:
            raise ValueError(f"{name}: prompt token ids must be in [0, {self.config.vocab_size})")
        if request.max_new_tokens < 1:
            raise ValueError(f"{name}: max_new_tokens must be at least 1, not {request.max_new_tokens}")
        if request.temperature < 0 or not 0 < request.top_p <= 1 or request.top_k < 0:
            raise ValueError(f"{name}: need temperature >= 0, 0 < top_p <= 1 and top_k >= 0")
        if not 1 <= request.n <= MAX_SAMPLES:
            raise ValueError(f"{name}: n must be in [1, {MAX_SAMPLES}], not {request.n}")
        if not 0 <= request.seed <= 2**32 - request.n:
            raise ValueError(f"{name}: seed must be in [0, 2**32 - n] (sample i is seeded seed + i)")
        if len(request.stop) > MAX_REQUEST_STOP_TOKENS:
            raise ValueError(f"{name}: at most {MAX_REQUEST_STOP_TOKENS} stop tokens, not {len(request.stop)}")
        if not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS or (request.top_logprobs and not request.logprobs):
            raise ValueError(f"{name}: top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], and 0 without logprobs")

    def generate(self, requests: Iterable[Request]) -> list[Result]:
        """Results in the order of `requests`, a request's n samples in the order of their index."""
        requests = list(requests)
        first = np.cumsum([0] + [r.n for r in requests])
        order = {id(r): first[i] for i, r in enumerate(requests)}
        results = [None] * first[-1]
        for request, result in self.run(requests):
            results[order[id(request)] + result.index] = result
        return results

    def run(self, requests: Iterable[Request]) -> Iterator[tuple[Request, Result]]:
        """Yields (request, result) as each request finishes, while the others keep running (see `stream`)."""
        return ((update.request, update.result) for update in self.stream(requests) if update.result is not None)

    def stream(self, requests: Iterable[Request]) -> Iterator[Update]:
        """Yields, after every prefill and every decode call, an update for each request in it that generated:
        its new tokens, and its result once it has ended, while the others keep running. Requests are drawn
        from `requests` only as slots free up, so the iterable may be long and lazily read. Closing the
        iterator early drops the requests in flight.

        With `overlap`, each call is dispatched before the host reads the previous call's tokens, so the device
        never waits for the host's bookkeeping. A slot that ends in one call is then freed a call later; it
        stays inactive meanwhile, so the tokens are the same. No call is dispatched for sequences whose token
        budget or context the calls in flight use up. Where the pool is short of pages for the next decode call,
        the call in flight is read first, so that a preempted sequence has all its tokens."""
        pending = iter(requests)
        with self._mesh_context():
            slots = self.empty_slots()
            pool = _PagePool(self.kv_pages, self.page_size, self.max_slots, self.max_len // self.page_size,
                             self.data_shards)  # fmt: skip
            running: dict[int, _Sequence] = {}  # by slot, in the order admitted
            waiting: deque[_Sequence] = deque()  # preempted sequences, to run again first
            unread: Callable[[], list[Update]] | None = None  # the call in flight whose tokens are not read
            just_prefilled = False
            while True:
                self._admit(pending, waiting, running, pool)
                prefilling = [slot for slot, sequence in running.items() if sequence.prefilling]
                needs = self._page_needs(running)
                if prefilling and not (needs and just_prefilled):
                    slots, read = self._prefill_call(slots, prefilling, running, pool)
                    just_prefilled = True
                elif needs and (unread is None or pool.has_room(needs)):
                    slots = self._make_room(slots, needs, running, waiting, pool)
                    slots, read = self._step(slots, running, pool)
                    just_prefilled = False
                elif unread is not None:
                    read = None  # nothing to dispatch before the call in flight is read
                else:
                    return
                if self.overlap:
                    read, unread = unread, read
                if read is not None:
                    yield from read()

    def _admit(self, pending: Iterator[Request], waiting: deque[_Sequence], running: dict[int, _Sequence],
               pool: _PagePool) -> None:  # fmt: skip
        """Fills free slots, first with preempted sequences, then with requests drawn from `pending`, while
        the pool has the pages of their prompts (a slot's shard of it). With prefix caching, a sequence maps the
        cached pages its context starts with and prefills only the rest (`_mappable_pages`); one whose next page
        a sequence now prefilling is about to write waits for it (so a request's n samples share their prompt's
        pages and their prefill)."""
        closed = set()  # shards whose slots the next sequence does not take now
        for slot in [s for s in range(self.max_slots) if s not in running]:
            if pool.shard(slot) in closed:
                continue
            if not waiting:
                request = next(pending, None)
                if request is None:
                    return
                self.validate(request)
                for index in range(request.n):
                    sequence = _Sequence(request, list(request.prompt), index)
                    waiting.append(self._with_keys(sequence))
            sequence = waiting[0]
            mappable = sequence.keys[: self._mappable_pages(sequence)]
            if mappable:
                if self._written_soon(sequence, slot, running, pool):
                    closed.add(pool.shard(slot))
                    continue
                sequence.prefilled = pool.share(slot, mappable) * self.page_size
            if not pool.take(slot, len(sequence.context)):
                pool.release(slot)
                sequence.prefilled = 0
                closed.add(pool.shard(slot))
                continue
            running[slot] = waiting.popleft()

    def _with_keys(self, sequence: _Sequence) -> _Sequence:
        """The sequence with the keys of its context's full pages, where prefixes are cached."""
        if self.prefix_caching:
            sequence.keys = _page_keys(sequence.context, self.page_size)
        return sequence

    def _mappable_pages(self, sequence: _Sequence) -> int:
        """How many of its context's first pages a sequence may map from the cache instead of prefilling them: at
        least the context's last token is prefilled, for the logits of the next one, and the positions whose
        logits score prompt tokens it has not scored yet (a request asking for its prompt's scores scores them
        all, but after a preemption only those it lacks)."""
        pages = (len(sequence.context) - 1) // self.page_size
        if sequence.request.prompt_logprobs and len(sequence.prompt_logprobs) < len(sequence.request.prompt) - 1:
            pages = min(pages, len(sequence.prompt_logprobs) // self.page_size)
        return pages

    def _written_soon(self, sequence: _Sequence, slot: int, running: dict[int, _Sequence], pool: _PagePool) -> bool:
        """Whether the first page of `sequence` not cached for `slot` yet is one that a sequence now prefilling
        in the same shard writes."""
        cached, shard = pool.cached_for(slot), pool.shard(slot)
        wanted = next((key for key in sequence.keys if key not in cached), None)
        return wanted is not None and any(
            wanted in other.keys[other.prefilled // self.page_size :]
            for other_slot, other in running.items() if other.prefilling and pool.shard(other_slot) == shard
        )  # fmt: skip

    def _page_needs(self, running: dict[int, _Sequence]) -> dict[int, int]:
        """The tokens that each sequence that may decode in the next call may have in the cache after it, by
        slot, oldest first."""
        return {slot: min(sequence.cached() + self.steps_per_call, self.max_len) for slot, sequence in running.items()
                if not sequence.prefilling and sequence.may_go_on(self.max_len)}  # fmt: skip

    def _make_room(self, slots: Slots, needs: dict[int, int], running: dict[int, _Sequence],
                   waiting: deque[_Sequence], pool: _PagePool) -> Slots:  # fmt: skip
        """Gives each decoding sequence, oldest first, the pages for its `needs`. Where its shard of the pool runs
        short, the most recently admitted sequence of that shard gives its pages back and waits to run again."""
        for slot, need in needs.items():
            if slot not in running:
                continue
            while not pool.take(slot, need):
                victim = next(other for other in reversed(running) if pool.shard(other) == pool.shard(slot))
                waiting.appendleft(self._with_keys(running.pop(victim).preempted()))
                pool.release(victim)
                slots = _deactivate_jit(slots, np.int32(victim))
                self.preemptions += 1
                if victim == slot:
                    break
        return slots

    def _pieces(self, waiting: list[int], running: dict[int, _Sequence]) -> dict[int, int]:
        """The slots (at least one) whose prompts go on in the next prefill call within `prefill_tokens`, and
        how many tokens of each."""
        pieces = {}
        for slot in waiting:
            sequence = running[slot]
            piece = min(len(sequence.context) - sequence.prefilled, self.piece_len)
            width = _fit(self.length_buckets, max([piece, *pieces.values()]))
            if pieces and _fit(self.row_buckets, len(pieces) + 1) * width > self.prefill_tokens:
                break
            pieces[slot] = piece
        return pieces

    def _prefill_call(self, slots, waiting, running, pool):
        """Dispatches the next prefill call; returns the slots and a reader of its updates."""
        pieces = self._pieces(waiting, running)
        rows = _fit(self.row_buckets, len(pieces))
        tokens = np.zeros((rows, _fit(self.length_buckets, max(pieces.values()))), np.int32)
        first, count = np.zeros(rows, np.int32), np.zeros(rows, np.int32)
        targets = np.full(rows, self.max_slots, np.int32)  # out of range: padding rows write nowhere
        last = np.zeros(rows, bool)
        resumed, next_token = np.zeros(rows, np.int32), np.zeros(rows, np.int32)
        stop = np.full((rows, self.stop_width), -1, np.int32)
        following = np.full(tokens.shape, -1, np.int32)  # the prompt tokens to score
        settings = {name: np.zeros(rows, dtype) for name, (_, dtype) in REQUEST_SETTINGS.items()}
        for row, (slot, piece) in enumerate(pieces.items()):
            sequence = running[slot]
            request, start = sequence.request, sequence.prefilled
            tokens[row, :piece] = sequence.context[start : start + piece]
            if request.prompt_logprobs:
                # the prompt tokens after this piece's positions, but for those scored before a preemption (the
                # sequence keeps their scores; calls in flight score only positions before `start`); the
                # generated tokens a preempted sequence prefills again are no prompt tokens
                scored_from = max(start, len(sequence.prompt_logprobs))
                scored = request.prompt[scored_from + 1 : start + piece + 1]
                following[row, scored_from - start : scored_from - start + len(scored)] = scored
            first[row], count[row], targets[row] = start, piece, slot
            last[row] = start + piece == len(sequence.context)
            if sequence.generated:
                resumed[row], next_token[row] = len(sequence.generated), sequence.generated[-1]
            stops = (*self.stop_tokens, *request.stop)
            stop[row, : len(stops)] = stops
            for name, (field, _) in REQUEST_SETTINGS.items():
                settings[name][row] = getattr(request, field)
            settings["seed"][row] += sequence.index
            sequence.prefilled += piece
        settings["stop"] = stop
        self.prefill_shapes[tokens.shape] += 1
        self.prefilled_tokens += sum(pieces.values())
        in_call = {slot: running[slot] for slot in pieces}
        # a sequence that goes on after a preemption already has its first token
        finishing = {slot: running[slot] for row, slot in enumerate(pieces) if last[row] and not resumed[row]}
        slots, sampled, active, scores, prompt_scores = self._prefill(
            params=self.params, slots=slots, tokens=tokens, first=first, count=count, targets=targets, last=last,
            resumed=resumed, next_token=next_token, following=following, settings=settings,
            pages=pool.table.copy(), logprobs=_any_asks_logprobs(finishing),
            prompt_logprobs=bool((following >= 0).any()),
        )  # fmt: skip
        for sequence in finishing.values():
            sequence.unread += 1
        for slot in pieces:  # the calls after this one read its pages: any sequence may now map them
            sequence = running[slot]
            pool.publish(slot, sequence.keys[: sequence.prefilled // self.page_size])

        def read() -> list[Update]:
            first_tokens, first_scores, piece_scores = jax.tree.map(np.asarray, (sampled, scores, prompt_scores))
            for sequence in finishing.values():
                sequence.unread -= 1
            for row, sequence in enumerate(in_call.values()):
                scored = following[row] >= 0
                if scored.any():
                    sequence.prompt_logprobs += zip(following[row, scored].tolist(), piece_scores[row, scored].tolist())
            new_tokens = {
                slot: [(int(first_tokens[row]), (row,))] for row, slot in enumerate(pieces) if slot in finishing
            }
            return self._updates(new_tokens, first_scores, active, running, finishing, pool)

        return slots, read

    def _step(self, slots, running, pool):
        """Dispatches a decode call; returns the slots and a reader of its updates."""
        decoding = {slot: sequence for slot, sequence in running.items() if not sequence.prefilling}
        logprobs = _any_asks_logprobs(decoding)
        slots, tokens, emitted, active, scores = self._decode(params=self.params, slots=slots, pages=pool.table.copy(),
                                                               logprobs=logprobs)  # fmt: skip
        self.slot_steps += self.steps_per_call * self.max_slots
        for sequence in decoding.values():
            sequence.unread += self.steps_per_call

        def read() -> list[Update]:
            step_tokens, step_emitted, step_scores = jax.tree.map(np.asarray, (tokens, emitted, scores))
            for sequence in decoding.values():
                sequence.unread -= self.steps_per_call
            new_tokens = {
                slot: [(int(step_tokens[step, slot]), (step, slot)) for step in np.flatnonzero(step_emitted[:, slot])]
                for slot in decoding
            }
            return self._updates(new_tokens, step_scores, active, running, decoding, pool)

        return slots, read

    def _updates(
        self, new_tokens: dict[int, list[tuple[int, tuple[int, ...]]]], scores: TokenScores | None, active: jax.Array,
        running: dict[int, _Sequence], in_call: dict[int, _Sequence], pool: _PagePool,
    ) -> list[Update]:  # fmt: skip
        """Adds each slot's new tokens, given with their index in `scores` (None: the call scored nothing), to its
        request's (and their scores, if it asked for them), and frees the slots (and their pages) that ended.
        `in_call` holds the sequences the call ran, by slot: a slot whose sequence has ended since (overlap) is
        left alone, even when a new request has taken it. Slots left out of `new_tokens` were not in the call,
        or went on after a preemption."""
        active = np.asarray(active)
        updates = []
        for slot, indexed in new_tokens.items():
            sequence = in_call[slot]
            if running.get(slot) is not sequence:
                continue
            request, tokens = sequence.request, [token for token, _ in indexed]
            sequence.generated.extend(tokens)
            if request.logprobs:
                sequence.logprobs.extend(_token_logprob(scores, index, request.top_logprobs) for _, index in indexed)
            result = None
            if not active[slot]:
                del running[slot]
                pool.release(slot)
                result = self._result(sequence)
            updates.append(Update(request, tokens, result, sequence.index))
        return updates

    def _result(self, sequence: _Sequence) -> Result:
        request = sequence.request
        return Result(
            request.id, sequence.generated, self._reason(request, sequence.generated), len(request.prompt),
            sequence.index, logprobs=sequence.logprobs if request.logprobs else None,
            prompt_logprobs=sequence.prompt_logprobs if request.prompt_logprobs else None,
        )  # fmt: skip

    def _reason(self, request: Request, tokens: list[int]) -> str:
        if tokens[-1] in self.stop_tokens or tokens[-1] in request.stop:
            return "stop"
        if len(tokens) >= request.max_new_tokens:
            return "length"
        return "context"
