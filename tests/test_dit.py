"""DiT: the paper's sizes and FLOPs, adaLN-Zero at init, text conditioning, scan/remat
equivalence, mixed precision, logical sharding annotations (with a snapshot), input errors."""

import functools
import json
import math
import os
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_layers import constraint_specs

from diffusion import meshes, sharding
from diffusion.models import DIT_VARIANTS, DiT, blocks, dit_config, layers
from diffusion.models.dit import AdaLNModulation, DiTBlock, modulate

SNAPSHOTS = pathlib.Path(__file__).parent / "snapshots"

# DiT paper (Peebles & Xie 2023), table 1 / fig. 1: class-conditional ImageNet 256 (latent
# 32x32x4, learned sigma, 1000 classes). Gflops count a multiply-add as one flop.
PAPER = {
    "DiT-S/2": (33e6, 6.06),
    "DiT-B/2": (130e6, 23.01),
    "DiT-L/2": (458e6, 80.71),
    "DiT-XL/2": (675e6, 118.64),
}


def paper_config(variant):
    return dit_config(
        variant, in_channels=4, learn_sigma=True, conditioning="class", num_classes=1000
    )


def count_params(model):
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("variant", sorted(PAPER))
def test_paper_parameter_count_and_flops(variant):
    params_paper, gflops_paper = PAPER[variant]
    model = nnx.eval_shape(lambda: DiT(paper_config(variant), rngs=nnx.Rngs(0)))
    assert abs(count_params(model) / params_paper - 1) < 0.01
    graphdef, state = nnx.split(model)
    forward = lambda state, x, t, y: nnx.merge(graphdef, state)(x, t, labels=y)
    lowered = jax.jit(forward).lower(
        state,
        jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32),
        jax.ShapeDtypeStruct((1,), jnp.float32),
        jax.ShapeDtypeStruct((1,), jnp.int32),
    )
    gflops = lowered.cost_analysis()["flops"] / 2e9  # XLA counts a multiply-add as 2 flops
    assert abs(gflops / gflops_paper - 1) < 0.10


def test_variant_table_and_config_errors():
    assert {f"DiT-{s}/{p}" for s in "S B L XL".split() for p in (2, 4, 8)} < set(DIT_VARIANTS)
    assert dit_config("DiT-XL/2").width == 1152 and dit_config("DiT-XL/2").depth == 28
    with pytest.raises(ValueError, match="unknown DiT variant 'DiT-XXL/2'.*DiT-B/2"):
        dit_config("DiT-XXL/2")
    with pytest.raises(ValueError, match=r"unknown DiTConfig field\(s\) \['hidden'\].*width"):
        dit_config("tiny", hidden=3)
    with pytest.raises(ValueError, match="unknown conditioning 'audio'"):
        dit_config("tiny", conditioning="audio")
    with pytest.raises(ValueError, match="unknown input_stem 'hybrid'"):
        dit_config("tiny", input_stem="hybrid")
    with pytest.raises(ValueError, match="power of two.*got 6"):
        dit_config("tiny", input_stem="conv", patch_size=6)


# --------------------------------------------------------------------------------------------
# Tiny models and inputs
# --------------------------------------------------------------------------------------------

TINY = dict(width=32, depth=2, num_heads=4, patch_size=4, context_dim=24, pooled_dim=16)


def tiny(**overrides):
    return dit_config("tiny", **{**TINY, **overrides})


def text_inputs(seed=0, batch=2, length=6):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(batch, 16, 16, 3)), jnp.float32)
    t = jnp.asarray(rng.uniform(size=(batch,)), jnp.float32)
    context = jnp.asarray(rng.normal(size=(batch, length, 24)), jnp.float32)
    mask = jnp.asarray(np.arange(length)[None] < np.array([[length], [3]])[:batch], jnp.int32)
    pooled = jnp.asarray(rng.normal(size=(batch, 16)), jnp.float32)
    return x, t, context, mask, pooled


def forward(model, *args, **kwargs):
    """The model's forward pass, compiled (eager op-by-op dispatch is slow on CPU)."""
    return nnx.jit(lambda model, *args, **kwargs: model(*args, **kwargs))(model, *args, **kwargs)


def perturb(model, seed=0, scale=0.1):
    """Replace every parameter by random values so zero-initialised branches become active."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [
        scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)
    ]
    nnx.update(model, jax.tree.unflatten(treedef, new))
    return model


# --------------------------------------------------------------------------------------------
# adaLN-Zero and conditioning
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("conditioning", ["text", "class", "none"])
def test_adaln_zero_outputs_zeros_at_init(conditioning):
    model = DiT(tiny(conditioning=conditioning, num_classes=10), rngs=nnx.Rngs(0))
    x, t, context, mask, pooled = text_inputs()
    kwargs = {
        "text": dict(context=context, context_mask=mask, pooled=pooled),
        "class": dict(labels=jnp.array([3, 10])),  # 10 = the null class
        "none": {},
    }[conditioning]
    out = forward(model, x, t, **kwargs)
    assert out.shape == x.shape
    np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_each_block_is_the_identity_at_init():
    block = DiTBlock(tiny(), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 16, 32)), jnp.float32)
    condition = jnp.asarray(rng.normal(size=(2, 32)), jnp.float32)
    context = jnp.asarray(rng.normal(size=(2, 5, 32)), jnp.float32)
    out = block(x, condition, context, jnp.ones((2, 5)))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))


def test_modulate_and_zero_adaln():
    x = jnp.ones((2, 3, 4))
    shift, scale = jnp.full((2, 4), 0.5), jnp.full((2, 4), 1.0)
    np.testing.assert_allclose(np.asarray(modulate(x, shift, scale)), 2.5)
    chunks = AdaLNModulation(4, 6, rngs=nnx.Rngs(0))(jnp.ones((2, 4)))
    assert len(chunks) == 6 and all(np.all(np.asarray(c) == 0) for c in chunks)


def test_learned_sigma_doubles_output_channels():
    model = perturb(DiT(tiny(learn_sigma=True), rngs=nnx.Rngs(0)))
    x, t, context, mask, pooled = text_inputs()
    assert forward(model, x, t, context, mask, pooled).shape == (2, 16, 16, 6)


def test_output_conv_is_a_convolution_of_the_plain_dit_output():
    """With the same weights, the output_conv model's output is the plain model's output passed
    through its 3x3 convolution: the identity at init, a neighbour mix once trained."""
    from test_layers import numpy_same_convolution

    plain = perturb(DiT(tiny(), rngs=nnx.Rngs(0)))
    with_conv = DiT(tiny(output_conv=True), rngs=nnx.Rngs(0))
    nnx.update(with_conv, nnx.state(plain, nnx.Param))
    x, t, context, mask, pooled = text_inputs()
    reference = forward(plain, x, t, context, mask, pooled)
    np.testing.assert_array_equal(np.asarray(forward(with_conv, x, t, context, mask, pooled)),
                                  np.asarray(reference))  # fmt: skip
    rng = np.random.default_rng(3)
    with_conv.output_conv.kernel[...] = jnp.asarray(rng.normal(size=(3, 3, 3, 3)), jnp.float32)
    with_conv.output_conv.bias[...] = jnp.asarray(rng.normal(size=(3,)), jnp.float32)
    expected = numpy_same_convolution(
        reference, with_conv.output_conv.kernel[...], with_conv.output_conv.bias[...]
    )
    out = forward(with_conv, x, t, context, mask, pooled)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-4)


def test_config_model_output_conv_and_input_stem_reach_the_model_builder():
    from configs import base_dit
    from diffusion import families
    from diffusion.families import dit as dit_family

    # What the builder reads of a frozen CLIP text tower: its two widths.
    tower = types.SimpleNamespace(text_width=24, embed_dim=16)
    config = base_dit.get_config()
    data = families.DataFacts.from_config(config, 16)
    assert not dit_family.model_config(config, data, tower).output_conv
    config.model.output_conv = True
    assert dit_family.model_config(config, data, tower).output_conv
    assert dit_family.model_config(config, data, tower).input_stem == "patch"
    config.model.input_stem = "conv"
    assert dit_family.model_config(config, data, tower).input_stem == "conv"
    config.model.num_classes = 10  # the class-conditional recipes
    assert dit_family.model_config(config, data, None).output_conv
    assert dit_family.model_config(config, data, None).input_stem == "conv"


def test_text_conditioning_is_used_and_padding_is_ignored():
    model = perturb(DiT(tiny(), rngs=nnx.Rngs(0)))
    x, t, context, mask, pooled = text_inputs()
    base = np.asarray(forward(model, x, t, context, mask, pooled))
    _, _, other_context, _, other_pooled = text_inputs(seed=1)
    # another prompt: token states and pooled embedding each change the output
    assert np.abs(np.asarray(forward(model, x, t, other_context, mask, pooled)) - base).max() > 1e-3
    assert np.abs(np.asarray(forward(model, x, t, context, mask, other_pooled)) - base).max() > 1e-3
    # the time changes it too
    assert np.abs(np.asarray(forward(model, x, 1 - t, context, mask, pooled)) - base).max() > 1e-3
    # sample 1 has 3 real tokens: anything after them is ignored
    padded = context.at[1, 3:].set(123.0)
    np.testing.assert_allclose(
        np.asarray(forward(model, x, t, padded, mask, pooled)), base, atol=1e-6
    )


def test_word_conditioning_reads_the_words_as_a_set_and_ignores_their_padding():
    """With word_conditioning the words enter cross-attention as extra keys and adaLN as their
    masked mean: both are blind to the order of the words and to padded positions."""
    model = perturb(DiT(tiny(word_conditioning=True), rngs=nnx.Rngs(0)))
    x, t, context, mask, pooled = text_inputs()
    words = jnp.asarray(np.random.default_rng(7).normal(size=context.shape), jnp.float32)
    base = np.asarray(forward(model, x, t, context, mask, pooled, words=words))
    other = jnp.asarray(np.random.default_rng(8).normal(size=context.shape), jnp.float32)
    assert (
        np.abs(np.asarray(forward(model, x, t, context, mask, pooled, words=other)) - base).max()
        > 1e-3
    )
    # sample 1 has 3 real tokens: reorder them (and sample 0's first three), pad with junk
    reordered = words.at[:, :3].set(words[:, jnp.array([2, 0, 1])]).at[1, 3:].set(123.0)
    np.testing.assert_allclose(
        np.asarray(forward(model, x, t, context, mask, pooled, words=reordered)), base, atol=1e-5
    )
    with pytest.raises(
        ValueError, match=r"needs \['context', 'pooled', 'words'\]; missing \['words'\]"
    ):
        forward(model, x, t, context, mask, pooled)
    with pytest.raises(ValueError, match=r"unexpected \['words'\]"):
        forward(DiT(tiny(), rngs=nnx.Rngs(0)), x, t, context, mask, pooled, words=words)


def test_class_labels_are_used():
    model = perturb(DiT(tiny(conditioning="class", num_classes=10), rngs=nnx.Rngs(0)))
    x, t, *_ = text_inputs()
    a = forward(model, x, t, labels=jnp.array([1, 2]))
    b = forward(model, x, t, labels=jnp.array([1, 10]))
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert np.abs(np.asarray(a[1] - b[1])).max() > 1e-3


# --------------------------------------------------------------------------------------------
# scan, remat, attention implementations, mixed precision
# --------------------------------------------------------------------------------------------


def test_scan_layers_gives_the_same_outputs_for_the_same_weights():
    unscanned = perturb(DiT(tiny(), rngs=nnx.Rngs(0)))
    scanned = DiT(tiny(scan_layers=True), rngs=nnx.Rngs(1))
    assert count_params(scanned) == count_params(unscanned)
    blocks.copy_params_into_scanned(unscanned, scanned)
    inputs = text_inputs()
    np.testing.assert_allclose(
        np.asarray(forward(scanned, *inputs)),
        np.asarray(forward(unscanned, *inputs)),
        rtol=1e-5,
        atol=1e-6,
    )


@functools.cache
def loss_and_grads(policy, scan_layers):
    inputs = text_inputs()
    model = perturb(DiT(tiny(remat_policy=policy, scan_layers=scan_layers), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    loss = lambda s: jnp.mean(nnx.merge(graphdef, s)(*inputs) ** 2)
    return jax.jit(jax.value_and_grad(loss))(state)


@pytest.mark.parametrize("scan_layers, policy", [(False, "full"), (True, "dots_saveable")])
def test_remat_gives_identical_outputs_and_gradients(scan_layers, policy):
    reference_value, reference_grads = loss_and_grads("none", scan_layers)
    value, grads = loss_and_grads(policy, scan_layers)
    np.testing.assert_allclose(float(value), float(reference_value), rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6),
        grads,
        reference_grads,
    )


def test_fused_attention_matches_explicit_attention():
    explicit = perturb(DiT(tiny(), rngs=nnx.Rngs(0)))
    fused = perturb(DiT(tiny(attention_impl="fused"), rngs=nnx.Rngs(0)))
    inputs = text_inputs()
    np.testing.assert_allclose(
        np.asarray(forward(fused, *inputs)),
        np.asarray(forward(explicit, *inputs)),
        rtol=1e-4,
        atol=1e-5,
    )


def test_bfloat16_compute_keeps_float32_params():
    full = perturb(DiT(tiny(), rngs=nnx.Rngs(0)))
    half = perturb(DiT(tiny(dtype="bfloat16"), rngs=nnx.Rngs(0)))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(half, nnx.Param)))
    inputs = text_inputs()
    a, b = np.asarray(forward(full, *inputs)), np.asarray(forward(half, *inputs))
    assert b.dtype == np.float32
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()


# --------------------------------------------------------------------------------------------
# Sharding annotations
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("conditioning", ["text", "class"])
def test_every_parameter_has_logical_axes(scan_layers, conditioning):
    config = dit_config(
        "tiny", scan_layers=scan_layers, conditioning=conditioning, output_conv=True,
        word_conditioning=conditioning == "text", input_stem="conv" if scan_layers else "patch",
    )  # fmt: skip
    model = nnx.eval_shape(lambda: DiT(config, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    assert len(flat) > 20
    for path, variable in flat:
        axes = variable.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == variable.get_value().ndim, path
        assert set(axes) <= set(sharding.PARAMETER_AXIS_NAMES), (path, axes)
        assert len(set(axes)) == len(axes), (path, axes)  # one mesh axis per dimension at most
        assert (axes[0] == "layers") == (scan_layers and "blocks" in path), (path, axes)


def snapshot_check(name, table):
    path = SNAPSHOTS / f"{name}.json"
    table = {k: list(v) for k, v in sorted(table.items())}
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        SNAPSHOTS.mkdir(exist_ok=True)
        path.write_text(json.dumps(table, indent=1) + "\n")
    assert path.exists(), f"no snapshot {path}; run with UPDATE_SNAPSHOTS=1 to record it"
    assert json.loads(path.read_text()) == table


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("dit_tiny_text", {}),
        ("dit_tiny_class", dict(conditioning="class")),
        ("dit_tiny_text_scan", dict(scan_layers=True)),
    ],
)
def test_logical_axes_snapshot(name, overrides):
    model = nnx.eval_shape(lambda: DiT(dit_config("tiny", **overrides), rngs=nnx.Rngs(0)))
    snapshot_check(name, layers.logical_axes_of(model))


def test_parameters_are_created_sharded_as_the_logical_rules_say():
    """Each parameter's sharding follows its logical names through the default rules."""
    mesh = meshes.make_mesh({"fsdp": 2, "tensor": 4})
    model = sharding.create_sharded(lambda: DiT(tiny(scan_layers=True), rngs=nnx.Rngs(0)), mesh)
    kernel = model.blocks.blocks.mlp.fc1.kernel  # ('layers', 'embed', 'mlp')
    assert kernel.get_value().sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    query = model.blocks.blocks.attn.query_kernel  # ('layers', 'embed', 'heads', 'kv')
    assert tuple(query.get_value().sharding.spec)[:3] == (None, "fsdp", "tensor")
    shard_shape = kernel.get_value().addressable_shards[0].data.shape
    assert shard_shape == (kernel.shape[0], kernel.shape[1] // 2, kernel.shape[2] // 4)


def mesh_inputs(batch=8, length=6):
    """Text-mode inputs for a mesh test: a batch every mesh's batch axes divide, padded prompts."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(batch, 16, 16, 3)).astype(np.float32)
    t = rng.uniform(size=(batch,)).astype(np.float32)
    context = rng.normal(size=(batch, length, 24)).astype(np.float32)
    mask = (np.arange(length)[None] < rng.integers(1, length + 1, size=(batch, 1))).astype(np.int32)
    pooled = rng.normal(size=(batch, 16)).astype(np.float32)
    return x, t, context, mask, pooled


def grads_on_mesh(mesh_shape):
    """(loss, {path: gradient}, {path: PartitionSpec}) of a random-weight tiny DiT on a mesh."""
    mesh = meshes.make_mesh(mesh_shape, devices=jax.devices()[: math.prod(mesh_shape.values())])
    # Width 64: at width 32 XLA partitions differently and the bug below did not show.
    config = tiny(width=64)
    init = lambda: perturb(DiT(config, rngs=nnx.Rngs(0)))
    graphdef, state = sharding.create_sharded_state(init, mesh)
    inputs = sharding.shard_batch(mesh_inputs(), mesh)
    loss = lambda state: jnp.mean(nnx.merge(graphdef, state)(*inputs) ** 2)
    with sharding.activate(mesh):
        value, grads = jax.jit(jax.value_and_grad(loss))(state)
    flat = lambda tree: dict(nnx.to_flat_state(tree))
    specs = {path: v.get_value().sharding.spec for path, v in flat(state).items()}
    return float(value), {path: np.asarray(v.get_value()) for path, v in flat(grads).items()}, specs


def test_gradients_on_a_data_fsdp_tensor_mesh_equal_one_device_gradients():
    """Sharding must not change the maths: with random (non-zero) weights, the loss and every
    gradient on a 2 x 2 x 2 data x fsdp x tensor mesh equal those on one device. Guards the
    constraint on the adaLN chunks (dit.AdaLNModulation): without it XLA (jax 0.10.2) swapped
    batch shards in `gate * attn(h)` / `gate * mlp(h)` and the gate gradients changed sign."""
    one = {"data": 1, "fsdp": 1, "tensor": 1}
    reference_value, reference, _ = grads_on_mesh(one)
    value, grads, specs = grads_on_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert any("tensor" in jax.tree.leaves(tuple(spec)) for spec in specs.values())  # TP in use
    np.testing.assert_allclose(value, reference_value, rtol=1e-5)
    assert grads.keys() == reference.keys()
    for path, grad in grads.items():
        np.testing.assert_allclose(grad, reference[path], rtol=1e-4, atol=1e-6, err_msg=str(path))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_activations_constrained_with_the_divisibility_fallback(scan_layers, caplog):
    """The blocks' activations are constrained through sharding.with_logical_constraint: with a
    batch of 6 on a 2 x 4 data x fsdp mesh (8 does not divide 6) every constraint splits the batch
    over 'data' alone instead of ('data', 'fsdp'), and the forward pass runs and is unchanged."""
    model = perturb(DiT(tiny(scan_layers=scan_layers), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    inputs = mesh_inputs(batch=6)
    apply = lambda state, *inputs: nnx.merge(graphdef, state)(*inputs)
    reference = jax.jit(apply)(state, *inputs)
    mesh = meshes.make_mesh({"data": 2, "fsdp": 4})
    with sharding.activate(mesh):
        specs = constraint_specs(jax.make_jaxpr(apply)(state, *inputs).jaxpr)
        out = jax.jit(apply)(state, *inputs)
    # Two per block (input, output), the MLP's hidden units, six adaLN chunks, two final chunks.
    num_blocks = 1 if scan_layers else tiny().depth
    assert len(specs) == num_blocks * (2 + 1 + 6) + 2, specs
    assert all(spec[0] == "data" for spec in specs), specs
    assert "dimension 6 is not divisible by mesh axes ('data', 'fsdp')" in caplog.text
    np.testing.assert_allclose(np.asarray(out), np.asarray(reference), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    model = DiT(tiny(), rngs=nnx.Rngs(0))
    x, t, context, mask, pooled = text_inputs()
    with pytest.raises(ValueError, match="18x16 is not divisible by the patch size 4"):
        forward(model, jnp.zeros((2, 18, 16, 3)), t, context, mask, pooled)
    with pytest.raises(ValueError, match=r"needs \['context', 'pooled'\]; missing \['pooled'\]"):
        forward(model, x, t, context, mask)
    with pytest.raises(ValueError, match=r"unexpected \['labels'\]"):
        forward(model, x, t, context, mask, pooled, labels=jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="context_dim=24"):
        forward(model, x, t, context[..., :8], mask, pooled)
    with pytest.raises(ValueError, match="x has 4 channels"):
        forward(model, jnp.zeros((2, 16, 16, 4)), t, context, mask, pooled)
    with pytest.raises(ValueError, match=r"t must have shape \(batch,\)"):
        forward(model, x, t[:1], context, mask, pooled)
