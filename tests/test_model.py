"""The model's logits against transformers' GptOssForCausalLM on random checkpoints."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_config
from flax import nnx
from reference import load_reference, reference_logits

from gptoss_dist import from_pretrained
from gptoss_dist.config import FULL, SLIDING
from gptoss_dist.model import EXPERTS_IMPLEMENTATIONS, GptOss, experts_blocked, experts_ragged, forward, routed_experts
from gptoss_dist.random_checkpoint import write_random_checkpoint

pytest.importorskip("transformers")

# Two configs: (1) 3 layers, 2 query heads per KV head, top-3 of 6 experts, MXFP4 experts;
# (2) 5 layers with an irregular sliding/full pattern, 4 query heads per KV head, top-1 of 4 experts,
# a sliding window of 5, experts stored dequantized.
CONFIGS = {
    "odd-layers-top3-mxfp4": (small_config(), True),
    "irregular-layers-top1-unpacked": (
        small_config(
            num_layers=5, num_heads=8, num_kv_heads=2, num_experts=4, experts_per_token=1, sliding_window=5,
            layer_types=(FULL, SLIDING, SLIDING, FULL, SLIDING), intermediate_size=96,
        ),
        False,
    ),
}  # fmt: skip


def left_pad(prompts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    width = max(map(len, prompts))
    tokens = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    return tokens, mask


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers_on_a_padded_batch(tmp_path, name):
    cfg, packed = CONFIGS[name]
    directory = write_random_checkpoint(tmp_path, cfg, seed=3, packed=packed)
    ours = from_pretrained(directory, dtype=jnp.float32)
    reference = load_reference(directory)

    rng = np.random.default_rng(0)
    lengths = [37, 20, 3, 9]  # the longest spans several sliding windows
    prompts = [rng.integers(0, cfg.vocab_size, n) for n in lengths]
    tokens, mask = left_pad(prompts)
    logits = np.asarray(forward(ours, jnp.asarray(tokens), jnp.asarray(mask)))

    for row, prompt in enumerate(prompts):
        expected = reference_logits(reference, prompt)
        got = logits[row, tokens.shape[1] - len(prompt) :]
        scale = np.abs(expected).max()
        assert np.abs(got - expected).max() <= 1e-4 * scale, f"prompt {row} (length {len(prompt)})"


def test_right_padding_gives_the_same_logits_as_no_padding(small_checkpoint):
    model = from_pretrained(small_checkpoint, dtype=jnp.float32)
    prompt = np.arange(1, 13, dtype=np.int32)
    alone = np.asarray(forward(model, jnp.asarray(prompt[None])))
    padded = np.concatenate([prompt, np.zeros(5, np.int32)])[None]
    mask = (np.arange(17) < 12).astype(np.int32)[None]
    together = np.asarray(forward(model, jnp.asarray(padded), jnp.asarray(mask)))
    np.testing.assert_allclose(together[:, :12], alone, atol=1e-5)


def test_layers_slide_as_layer_types_say():
    cfg = small_config(num_layers=4, layer_types=(FULL, FULL, SLIDING, FULL))
    model = nnx.eval_shape(lambda: GptOss(cfg))
    assert [layer.attn.window for layer in model.layers] == [None, None, 8, None]


def test_bfloat16_model_is_as_close_to_float32_as_transformers_in_bfloat16(small_checkpoint):
    import torch

    tokens = np.random.default_rng(1).integers(0, 128, (2, 24))
    exact = np.asarray(forward(from_pretrained(small_checkpoint, dtype=jnp.float32), jnp.asarray(tokens)))
    fast_model = from_pretrained(small_checkpoint, dtype=jnp.bfloat16)
    assert fast_model.embed[...].dtype == jnp.bfloat16
    ours = np.asarray(forward(fast_model, jnp.asarray(tokens)))
    reference = load_reference(small_checkpoint, dtype=torch.bfloat16)
    theirs = np.stack([reference_logits(reference, row) for row in tokens])

    def relative_error(logits):
        return np.abs(logits - exact).mean() / np.abs(exact).mean()

    assert relative_error(ours) <= 1.5 * relative_error(theirs)


@pytest.mark.parametrize("num_tokens", [1, 5, 300])
def test_blocked_experts_equal_ragged_dot_experts(num_tokens):
    """The two expert kernels (blocks on CPU/GPU, ragged_dot on TPU) agree, unused experts included."""
    rng = np.random.default_rng(num_tokens)
    experts, hidden, inter, top_k = 6, 32, 48, 2
    rows = jnp.asarray(rng.normal(size=(num_tokens * top_k, hidden)), jnp.float32)
    group = np.sort(rng.choice([0, 2, 3, 6], num_tokens * top_k))  # experts 1, 4, 5 idle; 6 = held elsewhere
    sizes = jnp.asarray(np.bincount(group, minlength=7)[:6], jnp.int32)
    weights = [jnp.asarray(rng.normal(size=shape) / 4, jnp.float32) for shape in
               ((experts, hidden, 2 * inter), (experts, 2 * inter), (experts, inter, hidden), (experts, hidden))]  # fmt: skip
    args = (rows, jnp.asarray(group), sizes, *weights)
    blocked = experts_blocked(*args, limit=7.0, alpha=1.702)
    ragged = experts_ragged(*args, limit=7.0, alpha=1.702)
    held = group < experts
    np.testing.assert_allclose(np.asarray(blocked)[held], np.asarray(ragged)[held], rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(blocked)[~held] == 0)


@pytest.mark.parametrize("chunk_tokens", [4, 7])
def test_experts_in_chunks_of_tokens_equal_all_tokens_at_once(chunk_tokens):
    """23 tokens, 4 or 7 at a time (the last chunk partial, padded), on the experts 2.. of a model: each token's
    sum is the one it gets with every token at once, and a token routed only elsewhere gets zeros."""
    rng = np.random.default_rng(chunk_tokens)
    num_tokens, hidden, inter, experts_here = 23, 32, 48, 4
    x = jnp.asarray(rng.normal(size=(num_tokens, hidden)), jnp.float32)
    experts = rng.integers(0, 6, size=(num_tokens, 2))
    experts[0] = (0, 1)  # both held elsewhere
    weights = jnp.asarray(rng.dirichlet(np.ones(2), num_tokens), jnp.float32)
    params = [jnp.asarray(rng.normal(size=shape) / 4, jnp.float32) for shape in
              ((experts_here, hidden, 2 * inter), (experts_here, 2 * inter), (experts_here, inter, hidden),
               (experts_here, hidden))]  # fmt: skip

    def run(chunk):
        return np.asarray(routed_experts(x, jnp.asarray(experts), weights, *params, limit=7.0, alpha=1.702,
                                         first_expert=2, chunk_tokens=chunk))  # fmt: skip

    whole, chunked = run(num_tokens), run(chunk_tokens)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)
    assert np.all(chunked[0] == 0) and np.abs(chunked[1:]).min(axis=1).max() > 0


def test_experts_implementation_is_one_of_the_named_ones():
    with pytest.raises(ValueError, match=r"experts_implementation must be one of \('auto', 'ragged'"):
        nnx.eval_shape(lambda: GptOss(small_config(), experts_implementation="dense"))
    assert EXPERTS_IMPLEMENTATIONS == ("auto", "ragged", "blocked", "gpu_kernel", "tpu_kernel")


def test_the_model_stages_are_named_in_the_compiled_program():
    """Profiles read by stage: attention, routing and the experts carry their names (collectives only run
    under a mesh; test_sharding's meshes lower them)."""
    model = nnx.eval_shape(lambda: GptOss(small_config(num_layers=1, layer_types=(FULL,))))
    text = nnx.jit(lambda m, t: m(t)).lower(model, jnp.zeros((1, 4), jnp.int32)).as_text(debug_info=True)
    for stage in ("attention", "routing", "experts"):
        assert f"/{stage}/" in text, stage
