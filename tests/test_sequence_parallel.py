"""Sequence parallelism: Ulysses and ring attention (diffusion.models.attention) on meshes with
a 'sequence' axis equal the unsharded attention core, in value and gradients, and so do a tiny
text-conditioned DiT built with attention_impl='ulysses' or 'ring' and a tiny video DiT (Wan's
block) with Ulysses attention over its spatio-temporal tokens."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from diffusion import meshes, sharding
from diffusion.errors import UserError
from diffusion.models import DiT, VideoDiT, attention, dit_config, video_dit_config

P = PartitionSpec

MESHES = {
    "data2 x sequence4": {"data": 2, "sequence": 4},
    "sequence8": {"sequence": 8},
    "data2 x sequence2 x tensor2": {"data": 2, "sequence": 2, "tensor": 2},
}


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|: one number per array, scale-free."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def qkv(batch=4, tokens=16, heads=8, head_dim=8, key_tokens=None, seed=0):
    rng = np.random.default_rng(seed)
    normal = lambda length: jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), "f4")
    key_tokens = key_tokens or tokens
    return normal(tokens), normal(key_tokens), normal(key_tokens)


def make_mask(kind, q, k, seed=1):
    """None, a (B, 1, 1, S) key-padding mask (every row keeps its first key), or a per-head
    (1, H, T, S) causal-and-random mask (every query keeps key 0)."""
    rng = np.random.default_rng(seed)
    (batch, tokens, heads, _), key_tokens = q.shape, k.shape[1]
    if kind == "none":
        return None
    if kind == "key":
        key_mask = rng.uniform(size=(batch, key_tokens)) > 0.4
        key_mask[:, 0] = True
        return attention.make_attention_mask(tokens, jnp.asarray(key_mask))
    per_head = rng.uniform(size=(1, heads, tokens, key_tokens)) > 0.3
    per_head &= np.tril(np.ones((tokens, key_tokens), bool))
    per_head[..., 0] = True
    return jnp.asarray(per_head)


def attention_and_gradients(implementation, q, k, v, mask, cotangent):
    """(out, (dq, dk, dv)) of the attention core, the gradient of <out, cotangent>."""

    def objective(q, k, v):
        out = attention.dot_product_attention(q, k, v, mask, implementation)
        return jnp.sum(out * cotangent), out

    (_, out), grads = jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


# The collective each implementation moves tokens with, as the compiled HLO names it.
COLLECTIVE = {"ulysses": "all-to-all", "ring": "collective-permute"}


def token_spec(mesh):
    """(B, T, H, D) split as the default rules split it on ``mesh``."""
    return P(sharding.batch_axes(mesh), "sequence", "tensor" if "tensor" in mesh.shape else None)


def on_mesh(implementation, mesh, q, k, v, mask, key_spec):
    """Output and q/k/v gradients under the default rules on ``mesh``, with the inputs placed as
    a sharded model holds them, and the compiled program's HLO text."""
    place = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    batch = P(sharding.batch_axes(mesh))
    args = (
        place(q, token_spec(mesh)),
        place(k, key_spec),
        place(v, key_spec),
        mask if mask is None else place(mask, batch if mask.shape[0] > 1 else P()),
        place(cotangent_like(q), token_spec(mesh)),
    )
    step = jax.jit(functools.partial(attention_and_gradients, implementation))
    with sharding.activate(mesh):
        compiled = step.lower(*args).compile()
    out, grads = compiled(*args)
    return out, grads, compiled.as_text()


def cotangent_like(q):
    return jnp.asarray(np.random.default_rng(3).normal(size=q.shape), "f4")


def assert_equals_the_core(implementation, mesh, q, k, v, mask, key_spec) -> str:
    """Output and gradients on the mesh equal the 'xla' core's on one device (relative 1e-5);
    returns the sharded program's HLO text."""
    expected_out, expected_grads = attention_and_gradients("xla", q, k, v, mask, cotangent_like(q))
    out, grads, hlo = on_mesh(implementation, mesh, q, k, v, mask, key_spec)
    assert relative_error(out, expected_out) <= 1e-5
    for name, grad, expected in zip("qkv", grads, expected_grads, strict=True):
        assert relative_error(grad, expected) <= 1e-5, name
    return hlo


def make_mesh(shape):
    return meshes.make_mesh(shape, devices=jax.devices()[: math.prod(shape.values())])


# ------------------------------------------------------------------------------------------------
# The attention core
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_kind", ["none", "key", "per_head"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("implementation", list(COLLECTIVE))
def test_self_attention_equals_the_unsharded_core_in_value_and_gradients(
    implementation, mesh_name, mask_kind
):
    """Output and d/dq, d/dk, d/dv on the mesh equal the plain 'xla' core on one device; the
    program moves tokens with its own collective and never all-gathers (which would be correct
    too, but would hold every device's whole sequence of every head)."""
    mesh = make_mesh(MESHES[mesh_name])
    q, k, v = qkv()
    mask = make_mask(mask_kind, q, k)
    hlo = assert_equals_the_core(implementation, mesh, q, k, v, mask, token_spec(mesh))
    assert COLLECTIVE[implementation] in hlo
    assert "all-gather" not in hlo


@pytest.mark.parametrize("implementation", list(COLLECTIVE))
def test_cross_attention_splits_only_the_queries(implementation):
    """Keys shorter than the queries (text): only the queries are split over 'sequence', the
    keys stay whole on each device, and the result needs no collective at all."""
    mesh = make_mesh(MESHES["data2 x sequence4"])
    q, k, v = qkv(key_tokens=6, heads=2)  # 2 heads: not divisible by 4, not needed here
    hlo = assert_equals_the_core(implementation, mesh, q, k, v, make_mask("key", q, k), P("data"))
    assert not any(name in hlo for name in ("all-to-all", "collective-permute", "all-gather"))


def test_ring_attention_needs_no_head_divisibility():
    """6 heads on 4 sequence devices, which Ulysses refuses: the ring splits only tokens."""
    mesh = make_mesh(MESHES["data2 x sequence4"])
    q, k, v = qkv(heads=6)
    hlo = assert_equals_the_core(
        "ring", mesh, q, k, v, make_mask("per_head", q, k), P("data", "sequence")
    )
    assert "collective-permute" in hlo and "all-gather" not in hlo


def test_ring_rows_with_every_key_masked_give_zeros_as_the_core():
    """A query row that may see no key: the core's weights are all zero, so its output is 0;
    the ring's streaming softmax (whose running sum is then 0) must give 0 too, not NaN."""
    mesh = make_mesh(MESHES["sequence8"])
    q, k, v = qkv()
    mask = np.ones((1, 1, 16, 16), bool)
    mask[..., 5, :] = False
    attend = lambda q, k, v: attention.dot_product_attention(q, k, v, jnp.asarray(mask), "ring")
    with sharding.activate(mesh):
        out = jax.jit(attend)(q, k, v)
    np.testing.assert_array_equal(out[:, 5], 0.0)
    expected = attention.dot_product_attention(q, k, v, jnp.asarray(mask))
    assert relative_error(out, expected) <= 1e-5


@pytest.mark.parametrize("implementation", list(COLLECTIVE))
def test_without_a_split_token_axis_it_is_the_plain_core(implementation):
    """No mesh, or a mesh whose 'sequence' axis has size 1: the 'xla' core, no collective."""
    q, k, v = qkv()
    expected = attention.dot_product_attention(q, k, v)
    attend = lambda q, k, v: attention.dot_product_attention(q, k, v, None, implementation)
    np.testing.assert_array_equal(attend(q, k, v), expected)
    mesh = make_mesh({"data": 4, "sequence": 1})
    step = jax.jit(attend)
    with sharding.activate(mesh):
        assert relative_error(step(q, k, v), expected) <= 1e-6
        assert COLLECTIVE[implementation] not in step.lower(q, k, v).compile().as_text()


@pytest.mark.parametrize(
    "implementation, shape, message",
    [
        (
            "ulysses",
            dict(heads=6),
            r"6 heads \(6 per device after the head axes \(\) of 1 devices\) are not divisible "
            r"by the 4 devices of the sequence mesh axes \('sequence',\).*multiple of 4",
        ),
        (
            "ulysses",
            dict(tokens=6),
            r"^ulysses .*6 tokens cannot be split.*4 devices.*multiple of 4",
        ),
        ("ring", dict(tokens=6), r"^ring .*6 tokens cannot be split.*4 devices.*multiple of 4"),
    ],
)
def test_indivisible_heads_or_tokens_are_named(implementation, shape, message):
    mesh = make_mesh(MESHES["data2 x sequence4"])
    q, k, v = qkv(**shape)
    attend = lambda q, k, v: attention.dot_product_attention(q, k, v, None, implementation)
    with sharding.activate(mesh), pytest.raises(UserError, match=message):
        jax.jit(attend)(q, k, v)


# ------------------------------------------------------------------------------------------------
# A model
# ------------------------------------------------------------------------------------------------

TINY_TEXT_DIT = dict(
    width=32, depth=1, num_heads=4, patch_size=4, context_dim=24, pooled_dim=16
)  # 16 tokens of a 16x16 image, 4 heads: a 4-way sequence split leaves one head per device


def dit_inputs(batch=4, length=6):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(batch, 16, 16, 3)).astype(np.float32)
    t = rng.uniform(size=(batch,)).astype(np.float32)
    context = rng.normal(size=(batch, length, 24)).astype(np.float32)
    mask = (np.arange(length)[None] < rng.integers(1, length + 1, size=(batch, 1))).astype(np.int32)
    pooled = rng.normal(size=(batch, 16)).astype(np.float32)
    return x, t, context, mask, pooled


def randomised_dit(implementation):
    """The tiny DiT with every parameter random (zero-initialised branches active)."""
    model = DiT(
        dit_config("tiny", **TINY_TEXT_DIT, attention_impl=implementation), rngs=nnx.Rngs(0)
    )
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    nnx.update(
        model,
        jax.tree.unflatten(
            treedef,
            [
                0.1 * jax.random.normal(k, x.shape, x.dtype)
                for k, x in zip(keys, leaves, strict=True)
            ],
        ),
    )
    return model


def dit_loss_and_gradients(mesh_shape, implementation):
    """(loss, {path: gradient}, compiled HLO) of mean(DiT(inputs)^2) on a mesh."""
    mesh = make_mesh(mesh_shape)
    graphdef, state = sharding.create_sharded_state(lambda: randomised_dit(implementation), mesh)
    inputs = sharding.shard_batch(dit_inputs(), mesh)
    loss = lambda state: jnp.mean(nnx.merge(graphdef, state)(*inputs) ** 2)
    step = jax.jit(jax.value_and_grad(loss))
    with sharding.activate(mesh):
        compiled = step.lower(state).compile()
    value, grads = compiled(state)
    hlo = compiled.as_text()
    flat = {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(grads)}
    return float(value), flat, hlo


@functools.cache
def one_device_dit_loss_and_gradients():
    return dit_loss_and_gradients({"data": 1}, "xla")


@pytest.mark.parametrize("implementation", list(COLLECTIVE))
def test_a_text_dit_on_a_data_sequence_mesh_has_the_unsharded_loss_and_gradients(implementation):
    """Self-attention over split tokens, cross-attention to the text with the queries split, and
    the rest of the block on sequence-sharded tokens: the loss and every parameter gradient equal
    the one-device 'xla' model's (relative 1e-5)."""
    expected_loss, expected, _ = one_device_dit_loss_and_gradients()
    loss, grads, hlo = dit_loss_and_gradients({"data": 2, "sequence": 4}, implementation)
    assert COLLECTIVE[implementation] in hlo
    assert abs(loss - expected_loss) <= 1e-5 * abs(expected_loss)
    assert grads.keys() == expected.keys()
    # The key bias adds the same q . b to every logit of a query, which softmax cancels: its exact
    # gradient is zero and both programs give round-off there, compared against the model's scale.
    scale = max(np.max(np.abs(g)) for g in expected.values())
    for path, grad in grads.items():
        if "key_bias" in path:
            assert np.max(np.abs(grad)) <= 1e-7 * scale
            assert np.max(np.abs(expected[path])) <= 1e-7 * scale
        else:
            assert relative_error(grad, expected[path]) <= 1e-5, path


TINY_VIDEO_DIT = dict(
    width=32, depth=1, num_heads=4, ffn_dim=64, text_dim=24, patch_size=(1, 4, 4)
)  # 2 frames of 16x16: 32 tokens, 4 heads: a 4-way sequence split leaves one head per device


def video_dit_loss_and_gradients(mesh_shape, implementation):
    """(loss, {path: gradient}, compiled HLO) of mean(VideoDiT(clips)^2) on a mesh, every
    parameter random (the zero-initialised output projection included)."""
    mesh = make_mesh(mesh_shape)
    config = video_dit_config("tiny", **TINY_VIDEO_DIT, attention_impl=implementation)

    def init():
        model = VideoDiT(config, rngs=nnx.Rngs(0))
        leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.Param))
        keys = jax.random.split(jax.random.key(0), len(leaves))
        noisy = [
            0.1 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)
        ]
        nnx.update(model, jax.tree.unflatten(treedef, noisy))
        return model

    graphdef, state = sharding.create_sharded_state(init, mesh)
    x, t, context, mask, _ = dit_inputs()
    clips = np.stack([x, x[:, ::-1]], axis=1)  # (4, 2, 16, 16, 3)
    inputs = sharding.shard_batch((clips, t, context, mask), mesh)
    loss = lambda state: jnp.mean(nnx.merge(graphdef, state)(*inputs) ** 2)
    step = jax.jit(jax.value_and_grad(loss))
    with sharding.activate(mesh):
        compiled = step.lower(state).compile()
    value, grads = compiled(state)
    flat = {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(grads)}
    return float(value), flat, compiled.as_text()


def test_a_video_dit_on_a_data_sequence_mesh_has_the_unsharded_loss_and_gradients():
    """Wan's block (3-D rotary positions, RMS-normalised queries and keys, cross-attention to the
    text) with Ulysses attention over split spatio-temporal tokens: the loss and every parameter
    gradient equal the one-device 'xla' model's (relative 1e-5)."""
    expected_loss, expected, _ = video_dit_loss_and_gradients({"data": 1}, "xla")
    loss, grads, hlo = video_dit_loss_and_gradients({"data": 2, "sequence": 4}, "ulysses")
    assert COLLECTIVE["ulysses"] in hlo
    assert abs(loss - expected_loss) <= 1e-5 * abs(expected_loss)
    assert grads.keys() == expected.keys()
    scale = max(np.max(np.abs(g)) for g in expected.values())
    for path, grad in grads.items():
        if np.max(np.abs(expected[path])) <= 1e-7 * scale:  # a bias softmax cancels (see above)
            assert np.max(np.abs(grad)) <= 1e-6 * scale, path
        else:
            assert relative_error(grad, expected[path]) <= 1e-5, path
