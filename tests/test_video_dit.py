"""Video DiT (Wan 2.1's shape): 3-D rotary positions against their defining property and
diffusers' tables, 3-D patches, output shapes and the still image as a one-frame clip, zero
output at init, joint spatio-temporal attention, the text mask, scan + remat, fused attention
and bfloat16 equivalence, gradients on a sharded mesh, logical axes, the closed-form parameter
and FLOP counts, config and input errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_dit import snapshot_check

from diffusion import meshes, sharding
from diffusion.errors import UserError
from diffusion.models import blocks, layers, patches, rope
from diffusion.models.video_dit import (
    VIDEO_DIT_VARIANTS,
    VideoDiT,
    VideoDiTConfig,
    video_dit_config,
)
from diffusion.models.video_dit_costs import flops_per_example, parameter_count

# Head dimension 16: the rotary split is (8, 4, 4).
TINY = VideoDiTConfig(
    in_channels=3, out_channels=2, patch_size=(1, 2, 2), width=32, depth=2, num_heads=2,
    ffn_dim=48, text_dim=24, freq_dim=16,
)  # fmt: skip
BATCH, FRAMES, SIZE, TEXT = 2, 3, 4, 5


def count_params(model) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def abstract_model(config: VideoDiTConfig) -> nnx.Module:
    """The model's structure with shapes only: building real weights op by op costs a compile per
    shape."""
    return nnx.eval_shape(lambda: VideoDiT(config, rngs=nnx.Rngs(0)))


def random_model(config: VideoDiTConfig, seed: int = 0, scale: float = 0.3) -> nnx.Module:
    """A model with every parameter drawn from N(0, scale^2): the zero-initialised output
    projection would otherwise hide everything before it."""
    graphdef, state = nnx.split(abstract_model(config))
    rng = np.random.default_rng(seed)
    draw = lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype)
    return nnx.merge(graphdef, jax.tree.map(draw, state))


def apply_jitted(model: nnx.Module, *inputs) -> jax.Array:
    """model(*inputs) as one compiled program (op by op, each op would compile on its own)."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda state, *inputs: nnx.merge(graphdef, state)(*inputs))(state, *inputs)


@pytest.fixture(scope="module")
def model():
    return random_model(TINY)


@pytest.fixture(scope="module")
def forward(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(x, t, context, context_mask=None):
        return nnx.merge(graphdef, state)(x, t, context, context_mask)

    return run


@pytest.fixture(scope="module")
def inputs():
    kx, kt, kc = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (BATCH, FRAMES, SIZE, SIZE, TINY.in_channels))
    t = jax.random.uniform(kt, (BATCH,))
    context = jax.random.normal(kc, (BATCH, TEXT, TINY.text_dim))
    return x, t, context


# --------------------------------------------------------------------------------------------
# 3-D rotary positions
# --------------------------------------------------------------------------------------------


def rotated_dot(head_dim, grid, position_q, position_k, seed=0):
    """q . k after rotating q at `position_q` and k at `position_k` (grid indices)."""
    cos, sin = rope.grid_cos_sin(grid, head_dim)
    index = lambda p: np.ravel_multi_index(p, grid)
    q, k = jax.random.normal(jax.random.key(seed), (2, 1, 1, 1, head_dim))
    rq = rope.apply_rotary(q, cos[index(position_q)][None], sin[index(position_q)][None])
    rk = rope.apply_rotary(k, cos[index(position_k)][None], sin[index(position_k)][None])
    return float(jnp.sum(rq * rk)), float(jnp.linalg.norm(rq)), float(jnp.linalg.norm(q))


def test_rotary_dot_product_depends_only_on_the_offset_along_each_axis():
    grid, head_dim = (5, 6, 7), 16
    base, _, _ = rotated_dot(head_dim, grid, (1, 2, 3), (3, 1, 5))
    shifted, norm_rotated, norm = rotated_dot(head_dim, grid, (2, 4, 1), (4, 3, 3))  # same offsets
    assert shifted == pytest.approx(base, abs=1e-5)
    assert norm_rotated == pytest.approx(norm, rel=1e-6)  # a rotation
    for other in ((4, 1, 5), (3, 2, 5), (3, 1, 6)):  # one axis' offset changed: q . k changes
        assert abs(rotated_dot(head_dim, grid, (1, 2, 3), other)[0] - base) > 1e-3


def test_rotary_tables_equal_diffusers_wan_rotary_embedding():
    torch = pytest.importorskip("torch")
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    head_dim, grid = 128, (3, 4, 5)
    assert rope.axis_dims(head_dim) == (44, 42, 42)  # Wan: rows, columns 2 * (128 // 6) each
    theirs = WanRotaryPosEmbed(head_dim, (1, 2, 2), max_seq_len=1024)
    cos_t, sin_t = theirs(torch.zeros(1, 1, grid[0], 2 * grid[1], 2 * grid[2]))  # (1, N, 1, K)
    cos, sin = rope.grid_cos_sin(grid, head_dim)  # (N, K / 2); theirs repeats each pair's angle
    np.testing.assert_allclose(cos, cos_t[0, :, 0, 0::2].numpy(), atol=1e-6)
    np.testing.assert_allclose(sin, sin_t[0, :, 0, 1::2].numpy(), atol=1e-6)


def test_3d_patches_invert_and_match_the_2d_patches_frame_by_frame():
    clips = np.random.default_rng(0).standard_normal((2, 4, 6, 8, 3)).astype(np.float32)
    tokens = patches.patchify_3d(clips, (2, 3, 2))  # (B, 2 * 2 * 4, 2 * 3 * 2 * 3)
    assert tokens.shape == (2, 16, 36)
    np.testing.assert_array_equal(patches.unpatchify_3d(tokens, (2, 3, 2), 4, 6, 8), clips)
    per_frame = [patches.patchify(clips[:, f], 2) for f in range(4)]  # (B, 12, 12) each
    np.testing.assert_array_equal(
        patches.patchify_3d(clips, (1, 2, 2)), np.concatenate(per_frame, axis=1)
    )


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def test_output_shapes_and_the_still_image_as_a_one_frame_clip(forward, inputs):
    x, t, context = inputs
    out = forward(x, t, context)
    assert out.shape == (BATCH, FRAMES, SIZE, SIZE, TINY.out_channels)
    assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    image = forward(x[:, 0], t, context)  # (B, H, W, C) in, same rank out
    assert image.shape == (BATCH, SIZE, SIZE, TINY.out_channels)
    np.testing.assert_allclose(image, forward(x[:, :1], t, context)[:, 0], atol=1e-6)


def test_output_is_zero_at_initialisation(inputs):
    """The zero-initialised output projection: a from-scratch model predicts 0 everywhere."""
    x, t, context = inputs
    init_and_apply = lambda: VideoDiT(TINY, rngs=nnx.Rngs(0))(x, t, context)
    out = jax.jit(init_and_apply)()
    assert float(jnp.max(jnp.abs(out))) == 0.0


def test_attention_mixes_frames_and_follows_time_and_text(forward, inputs):
    x, t, context = inputs
    out = forward(x, t, context)
    later = forward(x.at[:, 0].add(1.0), t, context)  # change frame 0 only
    assert float(jnp.max(jnp.abs(later[:, 1:] - out[:, 1:]))) > 1e-3  # other frames see it
    assert float(jnp.max(jnp.abs(forward(x, 1.0 - t, context) - out))) > 1e-3
    assert float(jnp.max(jnp.abs(forward(x, t, -context) - out))) > 1e-3


def test_masked_text_tokens_are_ignored(forward, inputs):
    x, t, context = inputs
    mask = jnp.arange(TEXT)[None].repeat(BATCH, 0) < jnp.array([[3], [4]])  # (B, L)
    out = forward(x, t, context, mask)
    padded_changed = jnp.where(mask[..., None], context, 100.0)
    np.testing.assert_allclose(forward(x, t, padded_changed, mask), out, atol=1e-5)
    all_real = forward(x, t, context, jnp.ones((BATCH, TEXT), bool))
    np.testing.assert_allclose(all_real, forward(x, t, context), atol=1e-5)  # None = all real


def with_weights_of(model: nnx.Module, config: VideoDiTConfig) -> nnx.Module:
    """A model of `config` (same sizes, other execution choices) holding `model`'s weights."""
    twin = abstract_model(config)
    if config.scan_layers:
        blocks.copy_params_into_scanned(model, twin)
    else:
        nnx.update(twin, nnx.state(model, nnx.Param))
    return twin


def input_gradient(model, x, t, context):
    """(mean squared output, its gradient with respect to the clip): through every block's
    backward pass, with no parameter paths to match between stack layouts."""
    graphdef, state = nnx.split(model)
    loss = lambda x: jnp.mean(blocks.merge_here(graphdef, state)(x, t, context) ** 2)
    return jax.jit(jax.value_and_grad(loss))(x)


def test_scanned_rematerialised_blocks_equal_the_unrolled_stack(model, inputs):
    x, t, context = inputs
    scanned = with_weights_of(
        model, dataclasses.replace(TINY, scan_layers=True, remat_policy="full")
    )
    value, grad = input_gradient(scanned, x, t, context)
    reference_value, reference_grad = input_gradient(model, x, t, context)
    assert float(value) == pytest.approx(float(reference_value), rel=1e-5)
    np.testing.assert_allclose(grad, reference_grad, atol=1e-6)


def test_fused_attention_and_bfloat16_compute(model, forward, inputs):
    x, t, context = inputs
    reference = forward(x, t, context)
    fused = with_weights_of(model, dataclasses.replace(TINY, attention_impl="fused"))
    np.testing.assert_allclose(apply_jitted(fused, x, t, context), reference, atol=1e-5)
    half = with_weights_of(model, dataclasses.replace(TINY, dtype="bfloat16"))
    assert {p.dtype for p in jax.tree.leaves(nnx.state(half, nnx.Param))} == {
        jnp.dtype(jnp.float32)
    }
    out = apply_jitted(half, x, t, context)
    assert out.dtype == jnp.float32
    # bfloat16 keeps 8 bits of mantissa: ~0.4 % per rounding, a few % after two blocks.
    relative = jnp.linalg.norm(out - reference) / jnp.linalg.norm(reference)
    assert float(relative) < 0.05


@pytest.mark.parametrize("scan_layers", [False, True])
def test_every_parameter_has_logical_axes_and_their_snapshot(scan_layers):
    model = abstract_model(video_dit_config("tiny", scan_layers=scan_layers))
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    for path, variable in flat:
        axes = variable.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == variable.get_value().ndim, path
        assert len(set(axes)) == len(axes), (path, axes)  # one mesh axis per dimension at most
        assert (axes[0] == "layers") == (scan_layers and "blocks" in path), (path, axes)
    if scan_layers:  # the unscanned table is the same without the 'layers' axis
        snapshot_check("video_dit_tiny_scan", layers.logical_axes_of(model))


def sharded_loss_and_grads(mesh_shape, model, inputs):
    """(loss, {path: gradient}, {path: PartitionSpec}) of the model on a mesh, default rules."""
    devices = jax.devices()[: int(np.prod(list(mesh_shape.values())))]
    mesh = meshes.make_mesh(mesh_shape, devices=devices)
    graphdef, state = sharding.create_sharded_state(lambda: model, mesh)
    x, t, context = sharding.shard_batch(inputs, mesh)
    loss = lambda state: jnp.mean(nnx.merge(graphdef, state)(x, t, context) ** 2)
    with sharding.activate(mesh):
        value, grads = jax.jit(jax.value_and_grad(loss))(state)
    flat = lambda tree: dict(nnx.to_flat_state(tree))
    specs = {path: v.get_value().sharding.spec for path, v in flat(state).items()}
    return float(value), {path: np.asarray(v.get_value()) for path, v in flat(grads).items()}, specs


def test_gradients_on_a_data_fsdp_tensor_mesh_equal_one_device_gradients(model, inputs):
    """The logical axis names and activation constraints must not change the maths: loss and
    every gradient on a 2 x 2 x 2 data x fsdp x tensor mesh equal one device's."""
    batch = tuple(np.concatenate([a, a]) for a in map(np.asarray, inputs))  # 4 = data x fsdp
    reference_value, reference, _ = sharded_loss_and_grads({"data": 1}, model, batch)
    value, grads, specs = sharded_loss_and_grads({"data": 2, "fsdp": 2, "tensor": 2}, model, batch)
    assert any("tensor" in jax.tree.leaves(tuple(spec)) for spec in specs.values())  # TP in use
    assert value == pytest.approx(reference_value, rel=1e-5)
    assert grads.keys() == reference.keys()
    for path, grad in grads.items():
        np.testing.assert_allclose(grad, reference[path], rtol=1e-4, atol=1e-6, err_msg=str(path))


# --------------------------------------------------------------------------------------------
# Closed-form counts
# --------------------------------------------------------------------------------------------


def test_parameter_count_matches_the_model_and_diffusers(model):
    assert count_params(model) == parameter_count(TINY)
    no_norms = dataclasses.replace(TINY, qk_norm=False, cross_attn_norm=False)
    assert count_params(abstract_model(no_norms)) == parameter_count(no_norms)
    pytest.importorskip("torch")
    from diffusers import WanTransformer3DModel

    theirs = WanTransformer3DModel(
        patch_size=TINY.patch_size, num_attention_heads=TINY.num_heads,
        attention_head_dim=TINY.head_dim, in_channels=TINY.in_channels,
        out_channels=TINY.out_channels, text_dim=TINY.text_dim, freq_dim=TINY.freq_dim,
        ffn_dim=TINY.ffn_dim, num_layers=TINY.depth,
    )  # fmt: skip
    assert sum(p.numel() for p in theirs.parameters()) == parameter_count(TINY)


@pytest.mark.parametrize("variant", ["wan2.1-1.3b", "wan2.1-14b"])
def test_wan_sizes_count_as_diffusers_builds_them(variant):
    torch = pytest.importorskip("torch")
    from diffusers import WanTransformer3DModel

    config = video_dit_config(variant)
    with torch.device("meta"):  # shapes only: no memory for 14e9 parameters
        theirs = WanTransformer3DModel(
            patch_size=config.patch_size, num_attention_heads=config.num_heads,
            attention_head_dim=config.head_dim, in_channels=config.in_channels,
            out_channels=config.out_channels, text_dim=config.text_dim, ffn_dim=config.ffn_dim,
            num_layers=config.depth,
        )  # fmt: skip
    assert sum(p.numel() for p in theirs.parameters()) == parameter_count(config)


def matmul_flops(jaxpr) -> int:
    """2 x multiply-adds of every dot_general and convolution in a jaxpr, nested jaxprs
    included."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            kernel = eqn.invars[1].aval.shape
            out_features = kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
            macs_per_output = int(np.prod(kernel)) // out_features
            total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * macs_per_output
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += (
                2
                * int(np.prod(eqn.outvars[0].aval.shape))
                * int(np.prod([lhs[i] for i in contract]))
            )
        for param in eqn.params.values():
            for sub in param if isinstance(param, list | tuple) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    total += matmul_flops(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    total += matmul_flops(sub)
    return total


def test_flops_per_example_count_every_matmul_of_the_forward(model):
    """Against the dot_generals of the traced forward: an exact count, independent of the closed
    form (XLA's cost analysis would add elementwise work, which MFU leaves out)."""
    frames, size, text = 2, 6, 3
    x = jnp.zeros((1, frames, size, size, TINY.in_channels))
    context = jnp.zeros((1, text, TINY.text_dim))
    jaxpr = jax.make_jaxpr(lambda x, c: model(x, jnp.zeros((1,)), c))(x, context)
    assert matmul_flops(jaxpr.jaxpr) == flops_per_example(TINY, frames, size, size, text)


def test_word_conditioning_counts_and_reads_the_words_under_the_text_mask(inputs):
    """A model with word_conditioning: its parameters and matmuls match the closed forms, its
    output follows the words, and masked words are ignored as masked states are."""
    x, t, context = inputs
    config = dataclasses.replace(TINY, word_conditioning=True)
    model = random_model(config)
    assert count_params(model) == parameter_count(config)
    assert parameter_count(config) - parameter_count(TINY) == (
        TINY.text_dim * TINY.width + TINY.width * TINY.width + 2 * TINY.width
    )
    words = jax.random.normal(jax.random.key(7), context.shape)
    mask = jnp.arange(TEXT)[None].repeat(BATCH, 0) < jnp.array([[3], [4]])  # (B, L)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda *args: nnx.merge(graphdef, state)(*args))
    out = forward(x, t, context, mask, words)
    assert float(jnp.max(jnp.abs(forward(x, t, context, mask, -words) - out))) > 1e-3
    padded_changed = jnp.where(mask[..., None], words, 100.0)
    np.testing.assert_allclose(forward(x, t, context, mask, padded_changed), out, atol=1e-5)
    frames, size, text = 2, 6, 3
    clip, states = jnp.zeros((1, frames, size, size, 3)), jnp.zeros((1, text, TINY.text_dim))
    jaxpr = jax.make_jaxpr(lambda x, c: model(x, jnp.zeros((1,)), c, None, c))(clip, states)
    assert matmul_flops(jaxpr.jaxpr) == flops_per_example(config, frames, size, size, text)
    with pytest.raises(UserError, match="word_conditioning=True needs words"):
        model(x, t, context, mask)
    with pytest.raises(UserError, match="word_conditioning=False"):
        abstract_model(TINY)(x, t, context, mask, words)


def test_conv_input_stem_counts_and_sees_across_patch_borders(inputs):
    """A model with input_stem='conv': its parameters and matmuls (convolutions included) match
    the closed forms, and its tokens see across patch borders within a frame."""
    x, t, context = inputs
    config = dataclasses.replace(TINY, input_stem="conv", patch_size=(1, 4, 4))
    model = random_model(config)
    assert count_params(model) == parameter_count(config)
    # Convolutions 3 -> 8 -> 16 channels (width / 4, width / 2), then 16 -> width.
    stem = (9 * 3 * 8 + 8) + (9 * 8 * 16 + 16) + (16 * 32 + 32)
    patch_stem = dataclasses.replace(config, input_stem="patch")
    assert parameter_count(config) - parameter_count(patch_stem) == stem - (48 * 32 + 32)
    frames, size, text = 2, 8, 3
    clip, states = jnp.zeros((1, frames, size, size, 3)), jnp.zeros((1, text, TINY.text_dim))
    jaxpr = jax.make_jaxpr(lambda x, c: model(x, jnp.zeros((1,)), c))(clip, states)
    assert matmul_flops(jaxpr.jaxpr) == flops_per_example(config, frames, size, size, text)

    # The stem's tokens, in the blocks' (frame, row, column) order: a pixel reaches its own
    # patch's token and its neighbours' in the same frame (a linear patch: its own alone).
    clip = jnp.zeros((1, 2, 16, 16, 3))
    poked = clip.at[0, 1, 5, 6].set(1.0)  # frame 1, patch (1, 1) of the 4x4 grid
    tokens = jax.jit(model.patch_embed)(jnp.concatenate([clip, poked]))  # (2, 2 * 4 * 4, D)
    moved = np.nonzero(np.any(np.asarray(tokens[1] != tokens[0]), axis=-1))[0]
    cells = {(int(n) // 16, int(n) % 16 // 4, int(n) % 4) for n in moved}
    assert (1, 1, 1) in cells and len(cells) > 1
    assert all(f == 1 and abs(r - 1) <= 1 and abs(c - 1) <= 1 for f, r, c in cells), cells


# --------------------------------------------------------------------------------------------
# Config and input errors
# --------------------------------------------------------------------------------------------


def test_variants_and_config_errors():
    wan = video_dit_config("wan2.1-1.3b")
    assert (wan.width, wan.depth, wan.num_heads, wan.ffn_dim) == (1536, 30, 12, 8960)
    assert (wan.patch_size, wan.text_dim, wan.in_channels) == ((1, 2, 2), 4096, 16)
    assert {"tiny", "wan2.1-1.3b", "wan2.1-14b"} <= set(VIDEO_DIT_VARIANTS)
    assert VideoDiTConfig(patch_size=[1, 2, 2]).patch_size == (1, 2, 2)  # from a config.json
    with pytest.raises(UserError, match="unknown video DiT variant 'wan2.2'"):
        video_dit_config("wan2.2")
    with pytest.raises(UserError, match=r"unknown VideoDiTConfig field\(s\) \['heads'\]"):
        video_dit_config("tiny", heads=3)
    assert VideoDiTConfig(patch_size=np.array([1, 2, 2])).patch_size == (1, 2, 2)
    for patch in ((2, 2), (1, 2.5, 2), (0, 2, 2)):
        with pytest.raises(UserError, match="patch_size must be three positive integers"):
            VideoDiTConfig(patch_size=patch)
    with pytest.raises(UserError, match="width 100 is not divisible by num_heads 8"):
        VideoDiTConfig(width=100, num_heads=8)
    with pytest.raises(UserError, match="head dimension width / num_heads = 4 must be even"):
        VideoDiTConfig(width=16, num_heads=4)
    with pytest.raises(UserError, match="unknown attention_impl 'flash'"):
        VideoDiTConfig(attention_impl="flash")
    with pytest.raises(UserError, match="unknown input_stem 'hybrid'"):
        VideoDiTConfig(input_stem="hybrid")
    with pytest.raises(UserError, match="input_stem='conv' needs square patches"):
        VideoDiTConfig(input_stem="conv", patch_size=(1, 4, 8))
    with pytest.raises(UserError, match="input_stem='conv': a conv stem needs a patch size"):
        VideoDiTConfig(input_stem="conv", patch_size=(1, 3, 3))


def test_bad_inputs_name_the_problem(model, inputs):
    x, t, context = inputs
    with pytest.raises(UserError, match="x has 4 channels.*in_channels=3"):
        model(jnp.zeros((1, 1, 4, 4, 4)), t[:1], context[:1])
    with pytest.raises(UserError, match="clip size 1x5x4.*not divisible by patch_size"):
        model(jnp.zeros((1, 1, 5, 4, 3)), t[:1], context[:1])
    with pytest.raises(UserError, match="t must have shape"):
        model(x, t[:1], context)
    with pytest.raises(UserError, match="context must be"):
        model(x, t, context[..., :3])
    with pytest.raises(UserError, match="context_mask"):
        model(x, t, context, jnp.ones((BATCH, TEXT + 1), bool))
    with pytest.raises(UserError, match="exceeds rope_max_seq_len=2"):
        abstract_model(dataclasses.replace(TINY, rope_max_seq_len=2))(x, t, context)
