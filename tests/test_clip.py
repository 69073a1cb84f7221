"""CLIP: published sizes, logit scale, normalised embeddings, causal text tower with
end-of-text pooling, padding invariance, scan equivalence, sharding annotations, errors."""

import json
import math
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from diffusion import meshes, sharding
from diffusion.models import CLIP, CLIP_VARIANTS, clip_config, layers

SNAPSHOTS = pathlib.Path(__file__).parent / "snapshots"

# OpenAI CLIP parameter counts (published model cards / open_clip tables).
OPENAI_PARAMS = {"B/32": 151.3e6, "B/16": 149.6e6, "L/14": 427.6e6}


def count_params(model):
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def forward(model, method, *args):
    return nnx.jit(lambda model, *args: getattr(model, method)(*args))(model, *args)


@pytest.mark.parametrize("variant", sorted(OPENAI_PARAMS))
def test_published_parameter_counts(variant):
    model = nnx.eval_shape(lambda: CLIP(clip_config(variant), rngs=nnx.Rngs(0)))
    assert abs(count_params(model) / OPENAI_PARAMS[variant] - 1) < 0.01


def test_b32_parameter_count_equals_transformers_exactly():
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                           patch_size=32, image_size=224),
        projection_dim=512,
    )  # fmt: skip
    with torch.device("meta"):  # shapes only, nothing allocated
        hf = transformers.CLIPModel(config)
    ours = nnx.eval_shape(lambda: CLIP(clip_config("B/32"), rngs=nnx.Rngs(0)))
    assert count_params(ours) == sum(p.numel() for p in hf.parameters())


def test_variant_table_and_config_errors():
    assert {"tiny", "B/32", "B/16", "L/14", "L/14-336"} <= set(CLIP_VARIANTS)
    large = clip_config("L/14-336")
    assert (large.image_size, large.vision_width, large.context_length) == (336, 1024, 77)
    with pytest.raises(ValueError, match="unknown CLIP variant 'H/14'.*'B/16'"):
        clip_config("H/14")
    with pytest.raises(ValueError, match=r"unknown CLIPConfig field\(s\) \['depth'\]"):
        clip_config("tiny", depth=3)
    with pytest.raises(ValueError, match="image_size 30 is not divisible by patch_size 4"):
        clip_config("tiny", image_size=30)
    with pytest.raises(ValueError, match="unknown vision_stem 'hybrid'"):
        clip_config("tiny", vision_stem="hybrid")
    with pytest.raises(ValueError, match="power of two.*got 6"):
        clip_config("tiny", vision_stem="conv", image_size=36, patch_size=6)
    with pytest.raises(ValueError, match="width 130 is not divisible by 4"):
        clip_config("tiny", vision_stem="conv", vision_width=130, vision_heads=2)


@pytest.fixture(scope="module")
def model():
    return CLIP(clip_config("tiny"), rngs=nnx.Rngs(0))


def tokens_and_mask(lengths=(5, 3), length=8, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 1000, size=(len(lengths), length)).astype(np.int32)
    mask = (np.arange(length)[None] < np.array(lengths)[:, None]).astype(np.int32)
    return ids, mask


def test_embeddings_are_normalised_and_logit_scale_is_clamped(model):
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    ids, mask = tokens_and_mask()
    image_emb, text_emb, scale = forward(model, "__call__", images, ids, mask)
    assert image_emb.shape == text_emb.shape == (2, 128)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(image_emb), axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(text_emb), axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(float(scale), 1 / 0.07, rtol=1e-5)
    clamped = CLIP(clip_config("tiny"), rngs=nnx.Rngs(0))
    clamped.logit_scale.set_value(jnp.asarray(7.0))
    assert float(clamped.logit_scale_exp()) == pytest.approx(100.0, rel=1e-5)


def test_own_models_use_identity_pixel_normalisation(model):
    images = jnp.linspace(-1, 1, 32 * 32 * 3).reshape(1, 32, 32, 3)
    np.testing.assert_allclose(np.asarray(model.normalize_pixels(images)), images, atol=1e-6)


def test_text_tower_is_causal_and_pools_at_the_last_real_token(model):
    ids, mask = tokens_and_mask(lengths=(8, 8))
    states, pooled = forward(model, "text_states", ids, mask)
    changed = ids.copy()
    changed[:, 5] = (changed[:, 5] + 7) % 1000
    states2, _ = forward(model, "text_states", changed, mask)
    # positions before 5 cannot see token 5; positions from 5 on can
    np.testing.assert_array_equal(np.asarray(states)[:, :5], np.asarray(states2)[:, :5])
    assert np.abs(np.asarray(states - states2)[:, 5:]).min(axis=-1).max() > 0
    # pooled = projected final-LN state at the last unmasked position
    expected = np.asarray(states)[:, -1] @ np.asarray(model.text_projection.kernel[...])
    np.testing.assert_allclose(np.asarray(pooled), expected, rtol=1e-5, atol=1e-6)


def test_padding_beyond_the_mask_does_not_change_text_embeddings(model):
    ids, mask = tokens_and_mask(lengths=(5, 3))
    padded = ids.copy()
    padded[0, 5:] = 0
    padded[1, 3:] = 999
    a = forward(model, "encode_text", ids, mask)
    b = forward(model, "encode_text", padded, mask)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    ids2 = ids.copy()
    ids2[1, 2] = (ids2[1, 2] + 1) % 1000  # the last real token of sample 1 does matter
    c = forward(model, "encode_text", ids2, mask)
    assert np.abs(np.asarray(c[1] - a[1])).max() > 1e-4


def test_mean_pooling_has_no_class_token():
    model = CLIP(clip_config("tiny", vision_pooling="mean"), rngs=nnx.Rngs(0))
    assert model.vision.class_embedding is None
    assert model.vision.position.embedding.shape == (64, 128)
    out = forward(model, "encode_image", jnp.zeros((1, 32, 32, 3)))
    assert out.shape == (1, 128) and np.all(np.isfinite(np.asarray(out)))


def test_scan_layers_gives_the_same_embeddings_for_the_same_weights(model):
    scanned = CLIP(clip_config("tiny", scan_layers=True), rngs=nnx.Rngs(1))
    assert count_params(scanned) == count_params(model)
    layers.copy_params_into_scanned(model, scanned)
    images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    ids, mask = tokens_and_mask()
    for a, b in zip(
        forward(model, "__call__", images, ids, mask),
        forward(scanned, "__call__", images, ids, mask),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "overrides", [{}, {"scan_layers": True}, {"vision_stem": "conv"}], ids=["", "scan", "conv"]
)
def test_every_parameter_has_logical_axes(overrides):
    model = nnx.eval_shape(lambda: CLIP(clip_config("tiny", **overrides), rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    assert len(flat) > 30
    for path, variable in flat:
        axes = variable.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == variable.get_value().ndim, path
        assert set(axes) <= set(sharding.PARAMETER_AXIS_NAMES), (path, axes)
        assert len(set(axes)) == len(axes), (path, axes)


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("clip_tiny", {}),
        ("clip_tiny_scan", {"scan_layers": True}),
        ("clip_tiny_conv_stem", {"vision_stem": "conv"}),
    ],
)
def test_logical_axes_snapshot(name, overrides):
    model = nnx.eval_shape(lambda: CLIP(clip_config("tiny", **overrides), rngs=nnx.Rngs(0)))
    table = {k: list(v) for k, v in sorted(layers.logical_axes_of(model).items())}
    path = SNAPSHOTS / f"{name}.json"
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        SNAPSHOTS.mkdir(exist_ok=True)
        path.write_text(json.dumps(table, indent=1) + "\n")
    assert path.exists(), f"no snapshot {path}; run with UPDATE_SNAPSHOTS=1 to record it"
    assert json.loads(path.read_text()) == table


def test_activations_constrained_with_the_divisibility_fallback(model, caplog):
    """Both towers constrain their activations through sharding.with_logical_constraint: a batch
    of 6 on a 2 x 4 data x fsdp mesh falls back to 'data' alone, and the embeddings do not move."""
    graphdef, state = nnx.split(model)
    images = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (6, 32, 32, 3)), jnp.float32)
    ids, mask = tokens_and_mask(lengths=(5, 3, 8, 1, 2, 7))
    apply = lambda state, *inputs: nnx.merge(graphdef, state)(*inputs)[:2]
    reference = jax.jit(apply)(state, images, ids, mask)
    with sharding.activate(meshes.make_mesh({"data": 2, "fsdp": 4})):
        jaxpr = jax.make_jaxpr(apply)(state, images, ids, mask)
        out = jax.jit(apply)(state, images, ids, mask)
    specs = [
        e.params["sharding"].spec for e in jaxpr.eqns if e.primitive.name == "sharding_constraint"
    ]
    batch_specs = [spec for spec in specs if len(spec) == 3]  # (B, T, D) tokens, (B, T, hidden)
    # Per block: input, MLP hidden units, output; then the token embedding's rows.
    depth = model.config.vision_depth + model.config.text_depth
    assert len(batch_specs) == 3 * depth + 1, specs
    assert all(spec[0] == "data" for spec in batch_specs), specs
    assert "dimension 6 is not divisible by mesh axes ('data', 'fsdp')" in caplog.text
    for got, want in zip(out, reference, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise_clear_errors(model):
    with pytest.raises(ValueError, match="30x30 cannot be cut into 4x4 patches"):
        model.encode_image(jnp.zeros((1, 30, 30, 3)))
    with pytest.raises(ValueError, match="16x16 does not match the variant's 32x32"):
        model.encode_image(jnp.zeros((1, 16, 16, 3)))
    with pytest.raises(ValueError, match="NHWC with 3 channels"):
        model.encode_image(jnp.zeros((1, 32, 32, 1)))
    with pytest.raises(ValueError, match="token id 1000 is outside the vocabulary \\[0, 1000\\)"):
        model.encode_text(jnp.array([[1, 1000]]), jnp.ones((1, 2)))
    with pytest.raises(ValueError, match="33 tokens exceed the context length 32"):
        model.encode_text(jnp.ones((1, 33), jnp.int32), jnp.ones((1, 33)))
    assert math.isclose(clip_config("tiny").logit_scale_max, math.log(100))


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_family_loss_makes_identical_captions_positives(model, kind):
    """The CLIP family's loss with multi_positive: the tokens the towers read decide which pairs
    are positives (padding beyond the mask ignored); unique captions give bitwise the plain loss,
    and the chunked loss on 8 devices equals the global one. The towers embed identical captions
    identically, so the softmax loss's targets change nothing then; SigLIP's labels do."""
    import functools

    from diffusion import contrastive
    from diffusion.families.clip import clip_loss

    mesh = meshes.make_mesh({"data": 8})
    if kind == "sigmoid":
        model = CLIP(clip_config("tiny", logit_bias_init=-10.0), rngs=nnx.Rngs(0))

    def family_loss(batch, **options):
        return clip_loss(model, None, batch, None, kind=kind, mesh=mesh, **options)[0]

    def loss(batch, **options):
        return jax.jit(functools.partial(family_loss, **options))(batch)

    rng = np.random.default_rng(3)
    images = jnp.asarray(rng.uniform(-1, 1, (8, 32, 32, 3)), jnp.float32)
    ids, mask = tokens_and_mask(lengths=(5, 3, 5, 4, 3, 5, 2, 4))
    ids[2] = ids[0]  # the same caption as row 0
    ids[4, :3] = ids[1, :3]  # the same caption as row 1 up to its mask, other padding
    batch = dict(image=images, tokens=jnp.asarray(ids), mask=jnp.asarray(mask))
    image_emb = forward(model, "encode_image", images)
    text_emb = forward(model, "encode_text", batch["tokens"], batch["mask"])
    bias = model.logit_bias[...] if kind == "sigmoid" else None
    groups = np.array([0, 1, 0, 2, 1, 3, 4, 5])[:, None]  # the identical captions, written out
    want = contrastive.contrastive_loss(
        kind, image_emb, text_emb, model.logit_scale[...], bias, None, groups
    )
    got = loss(batch, multi_positive=True)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(loss(batch, multi_positive=True, chunked=True), want, rtol=1e-5)
    plain = loss(batch)
    if kind == "softmax":
        np.testing.assert_allclose(got, plain, rtol=1e-6)
    else:
        assert abs(float(got) - float(plain)) > 1e-3
    unique = dict(batch, tokens=jnp.asarray(tokens_and_mask(lengths=(5,) * 8)[0]))
    on, off = loss(unique, multi_positive=True), loss(unique, multi_positive=False)
    assert np.asarray(on).tobytes() == np.asarray(off).tobytes()
