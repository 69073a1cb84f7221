"""The Pallas splash attention core (diffusion.models.splash_attention, attention_impl 'splash'
and 'ulysses_splash') equals the einsum core ('xla') in value and gradients. On CPU the kernel
runs in Pallas interpret mode (chosen because the devices are CPUs), so the cases are tiny;
the TPU lowering is tests/test_aot_video.py's."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from diffusion import meshes, sharding
from diffusion.errors import UserError
from diffusion.models import VideoDiT, attention, video_dit_config
from diffusion.models.splash_attention import padded_length

P = PartitionSpec
TOLERANCE = 1e-5  # relative, float32: the kernel and the einsum sum in different orders


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|: one number per array, scale-free."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def qkv(batch, tokens, key_tokens, heads, head_dim, seed=0):
    rng = np.random.default_rng(seed)
    normal = lambda length: jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), "f4")
    return normal(tokens), normal(key_tokens), normal(key_tokens)


def key_padding_mask(lengths, key_tokens, query_tokens):
    """(B, 1, 1, S) mask keeping the first lengths[b] keys of example b (0: none)."""
    key_mask = jnp.arange(key_tokens)[None] < jnp.asarray(lengths)[:, None]
    return attention.make_attention_mask(query_tokens, key_mask, key_length=key_tokens)


def attention_and_gradients(implementation, q, k, v, mask):
    """(out, (dq, dk, dv)) of the core, the gradient of <out, a fixed random cotangent>."""
    cotangent = jnp.asarray(np.random.default_rng(3).normal(size=q.shape), "f4")

    def objective(q, k, v):
        out = attention.dot_product_attention(q, k, v, mask, implementation)
        return jnp.sum(out * cotangent), out

    (_, out), grads = jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


def assert_equal_in_value_and_gradients(actual, expected):
    (out, grads), (expected_out, expected_grads) = actual, expected
    assert relative_error(out, expected_out) <= TOLERANCE
    for name, grad, expected_grad in zip("qkv", grads, expected_grads, strict=True):
        assert np.all(np.isfinite(grad)), name
        assert relative_error(grad, expected_grad) <= TOLERANCE, name


def test_the_kernel_runs_interpreted_on_cpu():
    assert attention.splash_interpret() == (jax.default_backend() == "cpu")


def test_lengths_are_padded_to_whole_blocks():
    assert [padded_length(n) for n in (72, 200, 256, 512, 75_600)] == [128, 256, 256, 512, 75_776]


def test_self_attention_equals_the_einsum_core():
    """256 tokens (whole blocks), no mask."""
    q, k, v = qkv(batch=2, tokens=256, key_tokens=256, heads=2, head_dim=64)
    expected = attention_and_gradients("xla", q, k, v, None)
    assert_equal_in_value_and_gradients(attention_and_gradients("splash", q, k, v, None), expected)


def test_masked_cross_attention_of_unaligned_lengths_equals_the_einsum_core():
    """200 queries to 72 keys (both padded inside), a key mask that keeps 50 keys of the first
    example and none of the second (whose rows are zeros, as the einsum core gives)."""
    q, k, v = qkv(batch=2, tokens=200, key_tokens=72, heads=2, head_dim=32)
    mask = key_padding_mask([50, 0], key_tokens=72, query_tokens=200)
    expected = attention_and_gradients("xla", q, k, v, mask)
    actual = attention_and_gradients("splash", q, k, v, mask)
    assert_equal_in_value_and_gradients(actual, expected)
    assert not np.any(np.asarray(actual[0][1]))


def test_a_mask_that_varies_with_the_query_is_refused_naming_the_fix():
    q, k, v = qkv(batch=1, tokens=128, key_tokens=128, heads=1, head_dim=32)
    causal = attention.make_attention_mask(128, causal=True)
    with pytest.raises(UserError, match=r"key padding mask .* attention_impl='xla' or 'fused'"):
        attention.dot_product_attention(q, k, v, causal, "splash")


@pytest.mark.parametrize("implementation", ["splash", "ulysses_splash"])
def test_on_a_sequence_mesh_it_equals_the_einsum_core(implementation):
    """data 2 x sequence 2, the default rules: 'splash' splits the queries and gathers keys,
    'ulysses_splash' moves heads with all-to-alls and runs the kernel per device."""
    mesh = meshes.make_mesh({"data": 2, "sequence": 2}, devices=jax.devices()[:4])
    q, k, v = qkv(batch=2, tokens=256, key_tokens=256, heads=2, head_dim=32)
    mask = key_padding_mask([256, 100], key_tokens=256, query_tokens=256)
    expected = attention_and_gradients("xla", q, k, v, mask)
    place = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    tokens = P("data", "sequence")
    args = (place(q, tokens), place(k, tokens), place(v, tokens), place(mask, P("data")))
    step = jax.jit(functools.partial(attention_and_gradients, implementation))
    with sharding.activate(mesh):
        compiled = step.lower(*args).compile()
    assert_equal_in_value_and_gradients(compiled(*args), expected)
    if implementation == "ulysses_splash":
        assert "all-to-all" in compiled.as_text()


def test_a_video_dit_with_splash_equals_it_with_the_einsum_core():
    """A 1-block video DiT with random (not zero-initialised) weights, 32 tokens per clip and a
    text mask that hides half the second clip's prompt: self- and cross-attention by the
    kernel give the einsum core's prediction."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 2, 16, 16, 3)), "f4")
    t = jnp.asarray([0.3, 0.8], "f4")
    context = jnp.asarray(rng.normal(size=(2, 8, 128)), "f4")
    context_mask = jnp.asarray([[1] * 8, [1] * 4 + [0] * 4], "i4")

    def predict(implementation):
        config = video_dit_config("tiny", depth=1, attention_impl=implementation)
        graphdef, params, rest = nnx.split(VideoDiT(config, rngs=nnx.Rngs(0)), nnx.Param, ...)
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        noise = [
            0.1 * jax.random.normal(key, leaf.shape, leaf.dtype)
            for key, leaf in zip(keys, leaves, strict=True)
        ]
        model = nnx.merge(graphdef, jax.tree.unflatten(treedef, noise), rest)
        return model(x, t, context, context_mask)

    assert relative_error(predict("splash"), predict("xla")) <= TOLERANCE
