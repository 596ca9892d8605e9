"""Batched decoding: a KV cache in fixed slots, prefill in bucketed pieces of bounded size, many decode steps
per host round trip, and continuous batching (a slot whose sequence ends takes the next waiting request).

The cache keeps, per layer, [slots, length, kv_heads, head_dim] keys and values (`model.LayerCache`).
Full-attention layers keep `max_len` positions; sliding layers keep only their window, as a ring buffer
(position p at index p % window), which for GPT-OSS's 128-key window and long contexts halves the cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_dist.attention import DEFAULT_BLOCK
from gptoss_dist.config import ModelConfig
from gptoss_dist.model import CACHE_AXES, GptOss, LayerCache, Span, cache_length, cache_shape
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
SLOT_AXES = ("batch",)


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation: prompt token ids and how to continue them. `stop` adds stop token ids to the engine's.
    `logprobs` scores each generated token (with its `top_logprobs` most likely alternatives), `prompt_logprobs`
    each prompt token after the first (see `sampling`: the model's log-probabilities, before sampling)."""

    prompt: Sequence[int]
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: Sequence[int] = ()
    id: Any = None
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
    """A finished request: its generated tokens (a final stop token included) and why it ended:
    "stop" (a stop token), "length" (max_new_tokens) or "context" (the engine's max_len). If the request asked
    for them, the scores of its tokens (one each) and its prompt's tokens after the first with their
    log-probabilities, as (token id, log-probability)."""

    id: Any
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[tuple[int, float]] | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


@dataclasses.dataclass
class Update:
    """A request's progress in one engine call: the tokens it generated since its last update and, once it
    has ended, its result (whose tokens are all of its updates' tokens)."""

    request: Request
    tokens: list[int]
    result: Result | None = None


# ------------------------------------------------------------------------------------------- KV cache


def cache_bytes_per_sequence(cfg: ModelConfig, max_len: int, dtype=jnp.bfloat16) -> int:
    """Bytes of keys and values that one sequence of up to `max_len` tokens holds in the cache."""
    per_position = 2 * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize
    return per_position * sum(cache_length(cfg, layer, max_len) for layer in range(cfg.num_layers))


# -------------------------------------------------------------------------------------------- slots


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Slots:
    """What the device keeps per slot between steps: the cache, the token to feed next, counts, settings."""

    cache: list[LayerCache]
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
    """The next token of each slot, and with `logprobs` their scores."""
    logits = model.logits(hidden)[:, -1]
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
    following: jax.Array,
    settings: dict[str, jax.Array],
    *,
    max_len: int,
    attention_block: int,
    logprobs: bool = False,
    prompt_logprobs: bool = False,
) -> tuple[Slots, jax.Array, jax.Array, TokenScores | None, jax.Array | None]:
    """Runs a piece of each of n prompts into slots `targets` [n] (out of range: a padding row): `count` [n]
    tokens [n, T] (right-padded) at positions `first` [n] onwards, which attend to their slot's cache and to
    each other. Rows whose piece is the prompt's `last` [n] sample their first token and become active; the
    others stay inactive until their next piece. Returns the slots, the first tokens [n], which slots are active
    [B], with `logprobs` the first tokens' scores, and with `prompt_logprobs` the log-probabilities [n, T] of
    `following` [n, T], the prompt token after each position (-1: none), from the piece's logits (never more
    than a piece's); all but the slots replicated so that every process can read them."""
    model = nnx.merge(graphdef, params)
    span = Span(first=first, start=jnp.zeros_like(first), end=count, slot=targets)
    hidden, cache = model.hidden_states(tokens, span, slots.cache, attention_block=attention_block)
    final = jnp.take_along_axis(hidden, jnp.maximum(count - 1, 0)[:, None, None], axis=1)
    zeros = jnp.zeros_like(count)
    new = Slots(cache=None, token=zeros, length=first + count, generated=zeros, active=last, **settings)
    sampled, scores = _next_tokens(model, new, final, logprobs)
    new = dataclasses.replace(new, token=sampled, generated=last.astype(jnp.int32))
    new = dataclasses.replace(new, active=last & ~_finished(new, max_len))

    def scatter(old, update):
        return old.at[targets].set(update, mode="drop")

    merged = jax.tree.map(scatter, dataclasses.replace(slots, cache=None), new)
    prompt_scores = logprobs_of(model.logits(hidden), jnp.maximum(following, 0)) if prompt_logprobs else None
    outputs = jax.tree.map(replicated, (sampled, merged.active, scores, prompt_scores))
    return dataclasses.replace(merged, cache=cache), *outputs


def decode(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    slots: Slots,
    *,
    steps: int,
    max_len: int,
    attention_block: int,
    logprobs: bool = False,
) -> tuple[Slots, jax.Array, jax.Array, jax.Array, TokenScores | None]:
    """`steps` decode steps for every slot in one call; inactive slots neither change nor write to the cache.
    Returns the slots, the tokens [steps, B], which of them were generated by an active slot [steps, B], which
    slots are still active [B] and with `logprobs` the tokens' scores [steps, B, ...], all but the slots
    replicated."""
    model = nnx.merge(graphdef, params)

    def step(slots: Slots, _):
        live = slots.active
        span = Span(first=slots.length, start=jnp.zeros_like(slots.length), end=live.astype(jnp.int32))
        hidden, cache = model.hidden_states(slots.token[:, None], span, slots.cache, attention_block=attention_block)
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
    return slots, *jax.tree.map(replicated, (tokens, emitted, slots.active, scores))


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
    decode, static_argnames=("graphdef", "steps", "max_len", "attention_block", "logprobs"), donate_argnames=("slots",)
)

# ------------------------------------------------------------------------------------------- engine


def _any_asks(sequences: dict[int, _Sequence], score: str) -> bool:
    """Whether any of `sequences` asks for the scores named `score` (a Request field): then a call scores."""
    return any(getattr(sequence.request, score) for sequence in sequences.values())


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
    """A request in a slot: the prompt tokens already in the cache, the tokens generated so far and the scores
    it asked for."""

    request: Request
    prefilled: int = 0
    generated: list[int] = dataclasses.field(default_factory=list)
    unread: int = 0  # tokens that calls not read yet may have generated
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    prompt_logprobs: list[tuple[int, float]] = dataclasses.field(default_factory=list)

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.request.prompt)

    def may_go_on(self, max_len: int) -> bool:
        """Whether the sequence may be active after the calls not read yet: a stop token may end it sooner,
        but its token budget and the context end it for sure."""
        generated = len(self.generated) + self.unread
        return generated < self.request.max_new_tokens and len(self.request.prompt) + generated < max_len


class Engine:
    """Generates for a stream of requests with `max_slots` sequences in flight, each of at most `max_len`
    tokens (prompt and completion). `steps_per_call` decode steps run per host round trip.

    Prompts are prefilled in calls of about `prefill_tokens` (padded) tokens, which bounds prefill memory: short
    prompts share a call, and a longer prompt is cut into pieces that each attend to what the cache holds of it.
    While some slots are decoding, prefill calls alternate with decode calls, so a long prompt does not stall
    the batch. Attention runs in blocks of `attention_block` queries and keys. With `overlap`, the host reads a
    call's tokens while the next call runs."""

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
        if max_slots % data:
            raise ValueError(f"max_slots={max_slots} must be a multiple of the mesh's data axis ({data})")
        self.row_buckets = _buckets(data, max_slots)
        # the longest piece of a prompt that one call runs: calls have at least one row per data shard
        self.piece_len = min(max(1, prefill_tokens // self.row_buckets[0]), max_len)
        self.length_buckets = _buckets(min(min_prefill_len, self.piece_len), self.piece_len)
        self.graphdef, self.params = nnx.split(model)
        self.dtype = model.compute_dtype
        self._static = dict(graphdef=self.graphdef, max_len=max_len, attention_block=attention_block)
        self._prefill = partial(_prefill_jit, **self._static)
        self._decode = partial(_decode_jit, steps=steps_per_call, **self._static)
        self.slot_steps = 0  # decode steps x slots spent, for measuring batching efficiency
        self.prefill_shapes: Counter[tuple[int, int]] = Counter()  # (rows, width) of each prefill call run

    def cache_bytes_per_sequence(self) -> int:
        return cache_bytes_per_sequence(self.config, self.max_len, self.dtype)

    def _sharding(self, shape: tuple[int, ...], axes: Sequence[str | None]) -> jax.sharding.Sharding | None:
        if self.mesh is None:
            return None
        return jax.sharding.NamedSharding(self.mesh, logical_to_spec(axes, shape, mesh_sizes(self.mesh)))

    def _slot_layout(self) -> Slots:
        """Each Slots array as a `_Blank`: sliding layers' caches hold only their window."""
        cfg, count = self.config, self.max_slots
        shapes = [cache_shape(cfg, layer, count, self.max_len) for layer in range(cfg.num_layers)]
        cache = [LayerCache(*(_Blank(shape, self.dtype, CACHE_AXES) for _ in range(2))) for shape in shapes]
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
                count=per_row(np.int32), targets=per_row(np.int32), last=per_row(bool),
                following=self._abstract_input((rows, width), np.int32), settings=settings,
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
            return _decode_jit.lower(
                **self._static, steps=self.steps_per_call, params=self.params, slots=self.abstract_slots()
            )

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
        if not 0 <= request.seed < 2**32:
            raise ValueError(f"{name}: seed must be in [0, 2**32)")
        if len(request.stop) > MAX_REQUEST_STOP_TOKENS:
            raise ValueError(f"{name}: at most {MAX_REQUEST_STOP_TOKENS} stop tokens, not {len(request.stop)}")
        if not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS or (request.top_logprobs and not request.logprobs):
            raise ValueError(f"{name}: top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], and 0 without logprobs")

    def generate(self, requests: Iterable[Request]) -> list[Result]:
        """Results in the order of `requests`."""
        requests = list(requests)
        order = {id(r): i for i, r in enumerate(requests)}
        results = [None] * len(requests)
        for request, result in self.run(requests):
            results[order[id(request)]] = result
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
        budget or context the calls in flight use up."""
        pending, exhausted = iter(requests), False
        with self._mesh_context():
            slots = self.empty_slots()
            running: dict[int, _Sequence] = {}  # by slot, in the order admitted
            unread: Callable[[], list[Update]] | None = None  # the call in flight whose tokens are not read
            just_prefilled = False
            while True:
                free = [s for s in range(self.max_slots) if s not in running]
                if free and not exhausted:
                    admitted = self._take(pending, len(free))
                    exhausted = len(admitted) < len(free)
                    running.update((slot, _Sequence(request)) for slot, request in zip(free, admitted))
                waiting = [slot for slot, sequence in running.items() if sequence.prefilling]
                decoding = any(not seq.prefilling and seq.may_go_on(self.max_len) for seq in running.values())
                if waiting and not (decoding and just_prefilled):
                    slots, read = self._prefill_call(slots, waiting, running)
                    just_prefilled = True
                elif decoding:
                    slots, read = self._step(slots, running)
                    just_prefilled = False
                elif unread is not None:
                    read = None  # nothing left to dispatch: read the last call
                else:
                    return
                if self.overlap:
                    read, unread = unread, read
                if read is not None:
                    yield from read()

    def _take(self, pending: Iterator[Request], count: int) -> list[Request]:
        taken = [request for _, request in zip(range(count), pending)]
        for request in taken:
            self.validate(request)
        return taken

    def _pieces(self, waiting: list[int], running: dict[int, _Sequence]) -> dict[int, int]:
        """The slots (at least one) whose prompts go on in the next prefill call within `prefill_tokens`, and
        how many tokens of each."""
        pieces = {}
        for slot in waiting:
            sequence = running[slot]
            piece = min(len(sequence.request.prompt) - sequence.prefilled, self.piece_len)
            width = _fit(self.length_buckets, max([piece, *pieces.values()]))
            if pieces and _fit(self.row_buckets, len(pieces) + 1) * width > self.prefill_tokens:
                break
            pieces[slot] = piece
        return pieces

    def _prefill_call(self, slots, waiting, running):
        """Dispatches the next prefill call; returns the slots and a reader of its updates."""
        pieces = self._pieces(waiting, running)
        rows = _fit(self.row_buckets, len(pieces))
        tokens = np.zeros((rows, _fit(self.length_buckets, max(pieces.values()))), np.int32)
        first, count = np.zeros(rows, np.int32), np.zeros(rows, np.int32)
        targets = np.full(rows, self.max_slots, np.int32)  # out of range: padding rows write nowhere
        last = np.zeros(rows, bool)
        stop = np.full((rows, self.stop_width), -1, np.int32)
        following = np.full(tokens.shape, -1, np.int32)  # the prompt tokens to score
        settings = {name: np.zeros(rows, dtype) for name, (_, dtype) in REQUEST_SETTINGS.items()}
        for row, (slot, piece) in enumerate(pieces.items()):
            sequence = running[slot]
            request, start = sequence.request, sequence.prefilled
            tokens[row, :piece] = request.prompt[start : start + piece]
            if request.prompt_logprobs:
                scored = request.prompt[start + 1 : start + piece + 1]
                following[row, : len(scored)] = scored
            first[row], count[row], targets[row] = start, piece, slot
            last[row] = start + piece == len(request.prompt)
            stops = (*self.stop_tokens, *request.stop)
            stop[row, : len(stops)] = stops
            for name, (field, _) in REQUEST_SETTINGS.items():
                settings[name][row] = getattr(request, field)
            sequence.prefilled += piece
        settings["stop"] = stop
        self.prefill_shapes[tokens.shape] += 1
        in_call = {slot: running[slot] for slot in pieces}
        finishing = {slot: running[slot] for row, slot in enumerate(pieces) if last[row]}
        slots, sampled, active, scores, prompt_scores = self._prefill(
            params=self.params, slots=slots, tokens=tokens, first=first, count=count, targets=targets, last=last,
            following=following, settings=settings, logprobs=_any_asks(finishing, "logprobs"),
            prompt_logprobs=_any_asks(in_call, "prompt_logprobs"),
        )  # fmt: skip
        for sequence in finishing.values():
            sequence.unread += 1

        def read() -> list[Update]:
            first_tokens, first_scores, piece_scores = jax.tree.map(np.asarray, (sampled, scores, prompt_scores))
            for sequence in finishing.values():
                sequence.unread -= 1
            for row, sequence in enumerate(in_call.values()):
                scored = following[row] >= 0  # a prefix of the row, of a row that asked
                if scored.any():
                    sequence.prompt_logprobs += zip(following[row, scored].tolist(), piece_scores[row, scored].tolist())
            new_tokens = {slot: [(int(first_tokens[row]), (row,))] for row, slot in enumerate(pieces) if last[row]}
            return self._updates(new_tokens, first_scores, active, running, finishing)

        return slots, read

    def _step(self, slots, running):
        """Dispatches a decode call; returns the slots and a reader of its updates."""
        decoding = {slot: sequence for slot, sequence in running.items() if not sequence.prefilling}
        logprobs = _any_asks(decoding, "logprobs")
        slots, tokens, emitted, active, scores = self._decode(params=self.params, slots=slots, logprobs=logprobs)
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
            return self._updates(new_tokens, step_scores, active, running, decoding)

        return slots, read

    def _updates(
        self, new_tokens: dict[int, list[tuple[int, tuple[int, ...]]]], scores: TokenScores | None, active: jax.Array,
        running: dict[int, _Sequence], in_call: dict[int, _Sequence],
    ) -> list[Update]:  # fmt: skip
        """Adds each slot's new tokens, given with their index in `scores` (None: the call scored nothing), to its
        request's (and their scores, if it asked for them), and frees the slots that ended. `in_call` holds the sequences the call ran, by slot: a
        slot whose sequence has ended since (overlap) is left alone, even when a new request has taken it. Slots
        left out of `new_tokens` were not in the call."""
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
                result = self._result(sequence)
            updates.append(Update(request, tokens, result))
        return updates

    def _result(self, sequence: _Sequence) -> Result:
        request = sequence.request
        return Result(
            request.id, sequence.generated, self._reason(request, sequence.generated), len(request.prompt),
            logprobs=sequence.logprobs if request.logprobs else None,
            prompt_logprobs=sequence.prompt_logprobs if request.prompt_logprobs else None,
        )  # fmt: skip

    def _reason(self, request: Request, tokens: list[int]) -> str:
        if tokens[-1] in self.stop_tokens or tokens[-1] in request.stop:
            return "stop"
        if len(tokens) >= request.max_new_tokens:
            return "length"
        return "context"
