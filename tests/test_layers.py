"""The shared building blocks of diffusion.models: layers (matmul, norms, MLP, parameters and
their activation constraints), attention (masks, numerics), patches (patchify, stems, pixel
convolution) and embeddings (positions, timesteps)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion import meshes, sharding
from diffusion.errors import UserError
from diffusion.models import attention, blocks, embeddings, layers, patches


def numpy_attention(q, k, v, mask):
    """float64 reference: softmax(q k^T / sqrt(d)) v with masked keys removed."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    logits = np.where(mask, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", weights, v), weights


@pytest.fixture
def qkv():
    rng = np.random.default_rng(0)
    shape = (2, 5, 3, 8)  # (B, T, H, D)
    return tuple(jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(3))


# The splash kernel's per-example masks are key padding only (tests/test_splash_attention.py).
KEY_MASK_ONLY = ("splash", "ulysses_splash")
ANY_MASK = tuple(i for i in attention.ATTENTION_IMPLEMENTATIONS if i not in KEY_MASK_ONLY)


@pytest.mark.parametrize("implementation", attention.ATTENTION_IMPLEMENTATIONS)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_float64_reference(qkv, implementation, causal):
    q, k, v = qkv
    key_mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    mask = attention.make_attention_mask(5, key_mask, causal)
    if causal and implementation in KEY_MASK_ONLY:
        with pytest.raises(UserError, match="key padding mask"):
            attention.dot_product_attention(q, k, v, mask, implementation)
        return
    out = attention.dot_product_attention(q, k, v, mask, implementation)
    expected, _ = numpy_attention(q, k, v, np.asarray(mask))
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


def test_padded_keys_get_exactly_zero_weight(qkv):
    q, k, _ = qkv
    key_mask = jnp.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    weights = np.asarray(
        attention.attention_weights(q, k, attention.make_attention_mask(5, key_mask))
    )
    padded = ~np.asarray(key_mask, bool)[:, None, None, :]  # (B, 1, 1, S)
    assert np.all(weights[np.broadcast_to(padded, weights.shape)] == 0.0)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)


def test_padded_keys_do_not_change_attention_output():
    attn = attention.Attention(16, 4, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 3, 16)), jnp.float32)
    context = rng.normal(size=(2, 6, 16)).astype(np.float32)
    key_mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    changed = context.copy()
    changed[0, 4:] = 100.0
    changed[1, 2:] = -50.0
    a = attn(x, jnp.asarray(context), key_mask=key_mask)
    b = attn(x, jnp.asarray(changed), key_mask=key_mask)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = attn(x, jnp.asarray(changed))  # without the mask the padded keys do matter
    assert not np.allclose(np.asarray(a), np.asarray(c), atol=1e-3)


@pytest.mark.parametrize("implementation", ANY_MASK)
def test_causal_attention_cannot_see_the_future(implementation):
    attn = attention.Attention(8, 2, implementation=implementation, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 6, 8)), jnp.float32)
    # d out[i] / d in[j] over all features: (T, W, T, W) -> (T, T) norms
    jac = jax.jacobian(lambda x: attn(x, causal=True)[0])(x)[:, :, 0]
    influence = np.abs(np.asarray(jac)).sum(axis=(1, 3))  # (T_out, T_in)
    future = np.triu(np.ones((6, 6), bool), k=1)
    assert np.all(influence[future] == 0.0)
    assert np.all(influence[~future] > 0.0)


@pytest.mark.parametrize(
    "x_shape, kernel_shape, contracting, spec",
    [
        ((2, 5, 8), (8, 6), 1, "btd,dn->btn"),  # Dense on tokens
        ((2, 5, 8), (8, 3, 4), 1, "btd,dhk->bthk"),  # attention's q/k/v projection
        ((2, 5, 3, 4), (3, 4, 8), 2, "bthk,hkd->btd"),  # attention's output projection
        ((7, 8), (8, 6), 1, "bd,dn->bn"),  # a plain 2-D matmul (adaLN modulation)
    ],
)
@pytest.mark.parametrize("flatten", [True, False])  # CPU's form and TPU / GPU's
def test_matmul_is_the_einsum_and_so_is_its_gradient(
    x_shape, kernel_shape, contracting, spec, flatten
):
    rng = np.random.default_rng(0)
    x, kernel = rng.normal(size=x_shape), rng.normal(size=kernel_shape)
    cotangent = rng.normal(size=np.einsum(spec, x, kernel).shape)
    out = layers.matmul(
        jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32), contracting, flatten
    )
    np.testing.assert_allclose(np.asarray(out), np.einsum(spec, x, kernel), rtol=1e-5, atol=1e-5)

    # Gradients of <cotangent, x . kernel> in float64 numpy: the weight gradient contracts the
    # leading dims (the product's reason to exist), the input gradient the kernel's outputs.
    def pullback(x, kernel):
        y = layers.matmul(x, kernel, contracting, flatten)
        return jnp.sum(y * jnp.asarray(cotangent, jnp.float32))

    dx, dkernel = jax.grad(pullback, argnums=(0, 1))(
        jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32)
    )
    lhs, rhs = spec.split("->")[0].split(","), spec.split("->")[1]
    np.testing.assert_allclose(
        np.asarray(dkernel), np.einsum(f"{lhs[0]},{rhs}->{lhs[1]}", x, cotangent), atol=1e-4
    )
    np.testing.assert_allclose(
        np.asarray(dx), np.einsum(f"{rhs},{lhs[1]}->{lhs[0]}", cotangent, kernel), atol=1e-4
    )


def test_matmul_flattens_rows_in_cpu_programs_only():
    x, kernel = jnp.ones((2, 5, 8)), jnp.ones((8, 6))

    def has_reshape(fn):
        return "reshape" in str(jax.make_jaxpr(fn)(x, kernel))

    assert layers.flatten_rows_here()  # the tests run on CPU, with no mesh active
    assert has_reshape(layers.matmul)
    assert not has_reshape(lambda x, kernel: layers.matmul(x, kernel, flatten=False))
    # tests/test_aot.py checks the other side: a TPU topology's mesh picks the plain contraction.


def test_matmul_names_shapes_that_do_not_contract():
    with pytest.raises(ValueError, match=r"x \(2, 5, 8\) and kernel \(6, 4\) do not contract"):
        layers.matmul(jnp.zeros((2, 5, 8)), jnp.zeros((6, 4)))


def test_mlp_activations():
    x = jnp.linspace(-4, 4, 33)
    np.testing.assert_allclose(
        np.asarray(layers.quick_gelu(x)), np.asarray(x) / (1 + np.exp(-1.702 * np.asarray(x))),
        rtol=1e-6, atol=1e-7,
    )  # fmt: skip
    exact = 0.5 * np.asarray(x) * (1 + np.vectorize(math.erf)(np.asarray(x) / math.sqrt(2)))
    np.testing.assert_allclose(np.asarray(layers.ACTIVATIONS["gelu"](x)), exact, atol=1e-6)
    with pytest.raises(ValueError, match="unknown activation 'relu6'.*quick_gelu"):
        layers.MLP(4, 8, "relu6", rngs=nnx.Rngs(0))


def test_layer_norm_uses_float32_statistics():
    rng = np.random.default_rng(3)
    x = rng.normal(loc=3.0, scale=2.0, size=(4, 64))
    norm = layers.LayerNorm(64, eps=1e-5, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    y = norm(jnp.asarray(x, jnp.float32))
    assert y.dtype == jnp.bfloat16
    expected = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    # only the final cast to bfloat16 loses precision (relative 2^-8)
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=1e-2, atol=1e-2)
    assert norm.scale.dtype == jnp.float32


def test_patchify_is_a_stride_p_convolution():
    rng = np.random.default_rng(4)
    images = jnp.asarray(rng.normal(size=(2, 8, 12, 3)), jnp.float32)
    embed = patches.PatchEmbed(4, 3, 5, rngs=nnx.Rngs(0))
    conv_kernel = embed.proj.kernel[...].reshape(4, 4, 3, 5)  # (p, p, C, D) = HWIO
    conv = jax.lax.conv_general_dilated(
        images, conv_kernel, (4, 4), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    expected = conv.reshape(2, -1, 5) + embed.proj.bias[...]
    np.testing.assert_allclose(np.asarray(embed(images)), np.asarray(expected), atol=1e-5)
    tokens = patches.patchify(images, 4)
    np.testing.assert_array_equal(np.asarray(patches.unpatchify(tokens, 4, 8, 12)), images)
    with pytest.raises(ValueError, match="10x12 is not divisible by the patch size 4"):
        patches.patchify(jnp.zeros((1, 10, 12, 3)), 4)


def numpy_same_convolution(images, kernel, bias):
    """float64 reference: zero-padded 'SAME' cross-correlation, NHWC images, HWIO kernel."""
    images, kernel = np.asarray(images, np.float64), np.asarray(kernel, np.float64)
    k = kernel.shape[0]
    pad = k // 2
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = np.zeros(images.shape[:3] + (kernel.shape[-1],))
    for dy in range(k):
        for dx in range(k):
            window = padded[:, dy : dy + images.shape[1], dx : dx + images.shape[2]]
            out += window @ kernel[dy, dx]
    return out + np.asarray(bias, np.float64)


def test_pixel_conv_is_the_identity_at_init_and_a_same_convolution():
    rng = np.random.default_rng(5)
    images = jnp.asarray(rng.normal(size=(2, 8, 12, 3)), jnp.float32)
    conv = patches.PixelConv(3, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(conv(images)), np.asarray(images))
    conv.kernel[...] = jnp.asarray(rng.normal(size=(3, 3, 3, 3)), jnp.float32)
    conv.bias[...] = jnp.asarray(rng.normal(size=(3,)), jnp.float32)
    expected = numpy_same_convolution(images, conv.kernel[...], conv.bias[...])
    np.testing.assert_allclose(np.asarray(conv(images)), expected, atol=1e-5)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        patches.PixelConv(3, kernel_size=2, rngs=nnx.Rngs(0))


def test_sincos_2d_depends_only_on_relative_position():
    emb = embeddings.sincos_2d(32, 5, 5).reshape(5, 5, 32)
    # first token (row 0, col 0): sin(0) = 0 then cos(0) = 1 for both halves
    np.testing.assert_array_equal(emb[0, 0], np.tile(np.repeat([0.0, 1.0], 8), 2))
    # sin a sin b + cos a cos b = cos(a - b): dot products depend only on the offset
    dot = lambda a, b: float(emb[a] @ emb[b])
    assert dot((0, 0), (1, 2)) == pytest.approx(dot((3, 2), (4, 4)), abs=1e-9)
    # DiT/MAE layout: the first half encodes the column, the second half the row
    np.testing.assert_array_equal(emb[0, :, :16], emb[4, :, :16])
    np.testing.assert_array_equal(emb[:, 0, 16:], emb[:, 4, 16:])
    assert not np.allclose(emb[1, 2], emb[2, 1])


def test_timestep_embedding_formula():
    t = jnp.array([0.0, 1.0, 250.5])
    emb = np.asarray(embeddings.timestep_embedding(t, 8))
    freqs = np.exp(-math.log(10000.0) * np.arange(4) / 4)
    expected = np.concatenate(
        [np.cos(np.outer([0.0, 1.0, 250.5], freqs)), np.sin(np.outer([0.0, 1.0, 250.5], freqs))], 1
    )
    np.testing.assert_allclose(emb, expected, atol=1e-4)


def constraint_specs(jaxpr):
    """The PartitionSpec of every sharding constraint in a jaxpr, nested jaxprs included."""
    specs = []
    for equation in jaxpr.eqns:
        if equation.primitive.name == "sharding_constraint":
            specs.append(equation.params["sharding"].spec)
        for value in equation.params.values():
            for inner in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    specs.extend(constraint_specs(inner))
    return specs


def test_mlp_constrains_its_hidden_units_only_under_active_rules():
    mlp = layers.MLP(4, 16, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(7).normal(size=(8, 3, 4)), jnp.float32)
    assert constraint_specs(jax.make_jaxpr(mlp)(x).jaxpr) == []  # no mesh, no rules: a no-op
    mesh = meshes.make_mesh({"data": 2, "tensor": 4})
    with sharding.activate(mesh):
        specs = constraint_specs(jax.make_jaxpr(mlp)(x).jaxpr)
        y = nnx.jit(lambda mlp, x: mlp(x))(mlp, x)
    # (B, T, hidden) named (activation_batch, activation_length, activation_mlp) by the rules.
    assert specs == [jax.sharding.PartitionSpec("data", None, "tensor")]
    np.testing.assert_allclose(np.asarray(y), np.asarray(mlp(x)), rtol=1e-6, atol=1e-6)


def test_make_param_rejects_unknown_axis_names():
    with pytest.raises(ValueError, match="unknown logical axis names \\['data'\\]"):
        layers.make_param(nnx.Rngs(0), layers.zeros, (2, 2), ("embed", "data"))
    # Activation names are not parameter names.
    with pytest.raises(ValueError, match="unknown logical axis names \\['activation_embed'\\]"):
        layers.make_param(nnx.Rngs(0), layers.zeros, (2, 2), ("embed", "activation_embed"))
    with pytest.raises(ValueError, match="unknown remat policy 'most'"):
        blocks.resolve_remat_policy("most")


def numpy_stride2_convolution(images, kernel, bias):
    """float64 reference: a 3x3 stride-2 cross-correlation, one pixel of zero padding per side
    (PyTorch's Conv2d(kernel_size=3, stride=2, padding=1)), NHWC images, HWIO kernel."""
    images, kernel = np.asarray(images, np.float64), np.asarray(kernel, np.float64)
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
    height, width = images.shape[1] // 2, images.shape[2] // 2
    out = np.zeros((images.shape[0], height, width, kernel.shape[-1]))
    for dy in range(3):
        for dx in range(3):
            out += padded[:, dy : dy + 2 * height : 2, dx : dx + 2 * width : 2] @ kernel[dy, dx]
    return out + np.asarray(bias, np.float64)


def numpy_gelu(x):
    """The tanh approximation of GELU (jax.nn.gelu's default), in float64."""
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def test_conv_stem_matches_a_float64_reference_and_keeps_the_patch_grid():
    rng = np.random.default_rng(6)
    images = jnp.asarray(rng.normal(size=(2, 8, 12, 3)), jnp.float32)
    stem = patches.ConvStem(4, 3, 16, rngs=nnx.Rngs(0))
    # Xiao et al.'s channels: doubling up to width / 2 (here 4, 8), then the projection.
    assert [k.shape for k in stem.kernels] == [(3, 3, 3, 4), (3, 3, 4, 8)]
    x = np.asarray(images, np.float64)
    for kernel, bias in zip(stem.kernels, stem.biases, strict=True):
        x = numpy_gelu(numpy_stride2_convolution(x, kernel[...], bias[...]))
    proj = np.asarray(stem.proj.kernel[...], np.float64), np.asarray(stem.proj.bias[...])
    expected = x.reshape(2, 2 * 3, 8) @ proj[0] + proj[1]  # one token per 4x4 cell, row-major
    tokens = stem(images)
    assert tokens.shape == patches.PatchEmbed(4, 3, 16, rngs=nnx.Rngs(0))(images).shape
    np.testing.assert_allclose(np.asarray(tokens), expected, atol=1e-4)


def test_conv_stem_on_clips_joins_each_cells_frames_in_patchify_3d_order():
    """Clips: each frame convolved alone, a token the projection of its cell's features in
    frames_per_token consecutive frames, tokens in patchify_3d's (frame, row, column) order."""
    rng = np.random.default_rng(7)
    clips = jnp.asarray(rng.normal(size=(2, 4, 8, 12, 3)), jnp.float32)  # (B, T, H, W, C)
    stem = patches.ConvStem(4, 3, 16, frames_per_token=2, rngs=nnx.Rngs(0))
    x = np.asarray(clips, np.float64).reshape(8, 8, 12, 3)
    for kernel, bias in zip(stem.kernels, stem.biases, strict=True):
        x = numpy_gelu(numpy_stride2_convolution(x, kernel[...], bias[...]))
    features = x.reshape(2, 4, 2, 3, 8)  # (B, T, rows, columns, C)
    # patchify_3d of the feature clip with patches (2, 1, 1): per token, its 2 frames' features.
    tokens_in = np.asarray(patches.patchify_3d(jnp.asarray(features), (2, 1, 1)), np.float64)
    assert tokens_in.shape == (2, 2 * 2 * 3, 2 * 8)
    proj = np.asarray(stem.proj.kernel[...], np.float64), np.asarray(stem.proj.bias[...])
    tokens = stem(clips)
    np.testing.assert_allclose(np.asarray(tokens), tokens_in @ proj[0] + proj[1], atol=1e-4)
    grid = patches.patchify_3d(clips, (2, 4, 4)).shape[1]  # the linear 3-D patches' token count
    assert tokens.shape == (2, grid, 16)
    with pytest.raises(ValueError, match="3 frames are not divisible by the 2 frames of a token"):
        stem(clips[:, :3])
    with pytest.raises(ValueError, match="embeds clips"):
        stem(clips[:, 0])


def test_conv_stem_tokens_see_their_cell_and_its_neighbours_only():
    images = jnp.zeros((1, 32, 32, 3))
    stem = patches.ConvStem(4, 3, 16, rngs=nnx.Rngs(1))
    row, col = 13, 22  # in cell (3, 5) of the 8x8 grid of 4x4 cells
    changed = np.any(stem(images.at[0, row, col].set(1.0)) != stem(images), axis=-1)
    changed_cells = {divmod(int(t), 8) for t in np.flatnonzero(changed[0])}
    assert (3, 5) in changed_cells
    assert all(abs(r - 3) <= 1 and abs(c - 5) <= 1 for r, c in changed_cells), changed_cells


def test_conv_stem_needs_a_power_of_two_patch():
    assert patches.conv_stem_depth(16, 768) == 4  # ViT-B/16: Xiao's four stride-2 convolutions
    with pytest.raises(ValueError, match="power of two"):
        patches.ConvStem(6, 3, 16, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="not divisible by 4"):
        patches.ConvStem(4, 3, 18, rngs=nnx.Rngs(0))
