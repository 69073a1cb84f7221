"""Contrastive losses against float64 numpy, the ring variant against the global one."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from diffusion import contrastive, meshes, sharding


def _embeddings(batch, dim, seed):
    rng = np.random.default_rng(seed)
    img, txt = rng.normal(size=(2, batch, dim))
    # Correlated pairs, so the losses are not all at chance.
    txt = img + 0.8 * txt
    img /= np.linalg.norm(img, axis=-1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=-1, keepdims=True)
    return img.astype(np.float32), txt.astype(np.float32)


def _logsumexp(x, axis):
    top = x.max(axis=axis, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))).squeeze(axis)


def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def softmax_reference(img, txt, logit_scale):
    """Float64 CLIP loss and its gradients (d/dimg, d/dtxt, d/dlogit_scale), by hand."""
    img, txt = img.astype(np.float64), txt.astype(np.float64)
    t = math.exp(min(logit_scale, math.log(100)))
    logits = t * img @ txt.T
    n = len(img)
    loss = 0.5 * (
        np.mean(_logsumexp(logits, 1) - np.diag(logits))
        + np.mean(_logsumexp(logits, 0) - np.diag(logits))
    )
    eye = np.eye(n)
    d_logits = 0.5 / n * ((_softmax(logits, 1) - eye) + (_softmax(logits, 0) - eye))
    d_scale = np.sum(d_logits * logits) if logit_scale < math.log(100) else 0.0
    return loss, t * d_logits @ txt, t * d_logits.T @ img, d_scale


def sigmoid_reference(img, txt, logit_scale, logit_bias):
    """Float64 SigLIP loss and its gradients (d/dimg, d/dtxt, d/dscale, d/dbias), by hand."""
    img, txt = img.astype(np.float64), txt.astype(np.float64)
    t = math.exp(logit_scale)
    logits = t * img @ txt.T + logit_bias
    n = len(img)
    z = 2 * np.eye(n) - 1
    loss = np.sum(np.log1p(np.exp(-z * logits))) / n
    d_logits = -z / (1 + np.exp(z * logits)) / n  # d/dl of -log sigmoid(z l) = -z sigmoid(-z l)
    d_scale = np.sum(d_logits * (logits - logit_bias))
    return loss, t * d_logits @ txt, t * d_logits.T @ img, d_scale, np.sum(d_logits)


def _grads(kind, img, txt, scale, bias):
    f = lambda i, t, s, b: contrastive.contrastive_loss(kind, i, t, s, b)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(img, txt, scale, bias)


@pytest.mark.parametrize("logit_scale", [math.log(1 / 0.07), 1.0, 6.0])  # 6.0 is above the cap
def test_softmax_loss_and_gradients_match_float64(logit_scale):
    img, txt = _embeddings(16, 6, seed=0)
    mesh = meshes.make_mesh({"data": 8})
    # Sharded inputs: the loss must still be over the GLOBAL batch, gradients unscaled.
    img_s, txt_s = (jax.device_put(x, sharding.batch_sharding(mesh)) for x in (img, txt))
    loss, (g_img, g_txt, g_scale, _) = _grads(
        "softmax", img_s, txt_s, jnp.float32(logit_scale), jnp.float32(0)
    )
    ref_loss, ref_img, ref_txt, ref_scale = softmax_reference(img, txt, logit_scale)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    # float32 logits up to 100 in magnitude: compare at float32 precision of the largest entry.
    atol = 1e-5 * np.abs(ref_img).max()
    np.testing.assert_allclose(g_img, ref_img, rtol=1e-4, atol=atol)
    np.testing.assert_allclose(g_txt, ref_txt, rtol=1e-4, atol=atol)
    np.testing.assert_allclose(g_scale, ref_scale, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    "logit_scale, logit_bias",
    [(contrastive.SIGLIP_INIT_LOGIT_SCALE, contrastive.SIGLIP_INIT_LOGIT_BIAS), (1.0, 0.5)],
)
def test_sigmoid_loss_and_gradients_match_float64(logit_scale, logit_bias):
    img, txt = _embeddings(16, 6, seed=1)
    loss, (g_img, g_txt, g_scale, g_bias) = _grads(
        "sigmoid", img, txt, jnp.float32(logit_scale), jnp.float32(logit_bias)
    )
    ref = sigmoid_reference(img, txt, logit_scale, logit_bias)
    np.testing.assert_allclose(loss, ref[0], rtol=1e-5)
    for got, want in zip((g_img, g_txt, g_scale, g_bias), ref[1:], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def _hard_negatives(img, seed):
    """Unit-norm captions close to each image (as a one-word swap is), row i for image i."""
    neg = img + 0.5 * np.random.default_rng(seed).normal(size=img.shape)
    return (neg / np.linalg.norm(neg, axis=-1, keepdims=True)).astype(np.float32)


def hard_negative_reference(kind, img, txt, neg, logit_scale, logit_bias):
    """Float64 loss with each image's own hard negative caption (NegCLIP), and d/dneg by hand:
    the negative is one more column of its image's row only."""
    img, txt, neg = (x.astype(np.float64) for x in (img, txt, neg))
    t = math.exp(min(logit_scale, math.log(100)))
    logits = t * img @ txt.T
    own = t * np.sum(img * neg, axis=1)  # (n,)
    n = len(img)
    if kind == "softmax":
        rows = np.concatenate([logits, own[:, None]], axis=1)  # (n, n + 1)
        image_side = np.mean(_logsumexp(rows, 1) - np.diag(logits))
        text_side = np.mean(_logsumexp(logits, 0) - np.diag(logits))
        d_own = 0.5 / n * _softmax(rows, 1)[:, -1]
        return 0.5 * (image_side + text_side), t * d_own[:, None] * img
    z = 2 * np.eye(n) - 1
    pairs = np.sum(np.log1p(np.exp(-z * (logits + logit_bias))))
    negatives = np.sum(np.log1p(np.exp(own + logit_bias)))  # -log sigmoid(-(l))
    d_own = 1 / (1 + np.exp(-(own + logit_bias))) / n
    return (pairs + negatives) / n, t * d_own[:, None] * img


@pytest.mark.parametrize(
    "kind, logit_scale", [("softmax", 2.5), ("softmax", 6.0), ("sigmoid", 1.5)]
)
def test_hard_negative_captions_match_float64(kind, logit_scale):
    img, txt = _embeddings(16, 6, seed=5)
    neg = _hard_negatives(img, seed=6)
    bias = -2.0 if kind == "sigmoid" else None
    f = lambda n: contrastive.contrastive_loss(kind, img, txt, jnp.float32(logit_scale), bias, n)
    loss, g_neg = jax.jit(jax.value_and_grad(f))(neg)
    ref_loss, ref_g_neg = hard_negative_reference(kind, img, txt, neg, logit_scale, bias or 0.0)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(g_neg, ref_g_neg, rtol=1e-4, atol=1e-7)
    # A negative can only add to the loss: one more wrong candidate per image.
    assert loss > contrastive.contrastive_loss(kind, img, txt, jnp.float32(logit_scale), bias)


def test_hard_negatives_must_pair_one_per_image():
    img, txt = _embeddings(8, 4, seed=7)
    with pytest.raises(ValueError, match="one hard negative caption per image"):
        contrastive.contrastive_loss("softmax", img, txt, 1.0, None, txt[:4])


def test_identical_embeddings_give_chance_loss_ln_n():
    n = 8
    same = np.tile(np.eye(4, dtype=np.float32)[:1], (n, 1))  # every logit equal
    loss = contrastive.clip_softmax_loss(same, same, jnp.float32(2.0))
    np.testing.assert_allclose(loss, math.log(n), rtol=1e-6)


def test_logit_scale_is_clamped_at_ln_100():
    img, txt = _embeddings(8, 4, seed=2)
    at_cap = contrastive.clip_softmax_loss(img, txt, jnp.float32(math.log(100)))
    above = contrastive.clip_softmax_loss(img, txt, jnp.float32(9.0))
    np.testing.assert_allclose(above, at_cap, rtol=1e-6)
    assert contrastive.clamp_logit_scale(jnp.float32(9.0)) == pytest.approx(math.log(100))
    assert contrastive.CLIP_INIT_LOGIT_SCALE == pytest.approx(math.log(1 / 0.07))


def test_invalid_arguments_are_rejected():
    img, txt = _embeddings(8, 4, seed=3)
    with pytest.raises(ValueError, match="unknown contrastive loss kind 'cosine'"):
        contrastive.contrastive_loss("cosine", img, txt, 1.0)
    with pytest.raises(ValueError, match="needs logit_bias"):
        contrastive.contrastive_loss("sigmoid", img, txt, 1.0)
    with pytest.raises(ValueError, match="equal shapes"):
        contrastive.clip_softmax_loss(img, txt[:4], 1.0)
    mesh = meshes.make_mesh({"data": 8})
    img12, txt12 = _embeddings(12, 4, seed=3)
    with pytest.raises(ValueError, match="batch size 12 is not divisible by the 8 devices"):
        contrastive.ring_contrastive_loss("softmax", img12, txt12, 1.0, mesh=mesh)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize(
    "mesh_shape, with_negatives",
    [
        ({"data": 8}, False),
        ({"data": 2, "fsdp": 4}, False),
        ({"data": 2, "fsdp": 2, "tensor": 2}, False),
        ({"data": 2, "fsdp": 4}, True),
    ],
)
def test_ring_loss_equals_global_loss_in_value_and_gradient(kind, mesh_shape, with_negatives):
    mesh = meshes.make_mesh(mesh_shape)
    img, txt = _embeddings(32, 8, seed=4)
    neg = _hard_negatives(img, seed=8) if with_negatives else None
    img, txt, neg = (
        None if x is None else jax.device_put(x, sharding.batch_sharding(mesh))
        for x in (img, txt, neg)
    )
    scale, bias = jnp.float32(2.3), jnp.float32(-1.5)

    def ring(i, t, s, b):
        return contrastive.ring_contrastive_loss(kind, i, t, s, b, neg, mesh=mesh)

    def plain(i, t, s, b):
        return contrastive.contrastive_loss(kind, i, t, s, b, neg)

    ring_loss, ring_grads = jax.jit(jax.value_and_grad(ring, argnums=(0, 1, 2, 3)))(
        img, txt, scale, bias
    )
    loss, grads = jax.jit(jax.value_and_grad(plain, argnums=(0, 1, 2, 3)))(img, txt, scale, bias)
    np.testing.assert_allclose(ring_loss, loss, rtol=1e-5)
    for got, want in zip(ring_grads, grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    assert ring_grads[0].shape == img.shape


@pytest.mark.parametrize("with_tokens", [False, True])
def test_ring_loss_never_forms_the_global_logit_matrix(with_tokens):
    mesh = meshes.make_mesh({"data": 8})
    n, d = 256, 4
    spec = jax.ShapeDtypeStruct((n, d), jnp.float32, sharding=sharding.batch_sharding(mesh))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
    tokens = None
    if with_tokens:  # multi-positive targets: caption token ids travel with their text chunk
        tokens = jax.ShapeDtypeStruct((n, 8), jnp.int32, sharding=sharding.batch_sharding(mesh))

    def ring(i, t, s, tok):
        return contrastive.ring_contrastive_loss("softmax", i, t, s, None, None, tok, mesh=mesh)

    lowered = jax.jit(jax.grad(ring, argnums=(0, 1))).lower(spec, spec, scalar, tokens)
    compiled = lowered.compile()
    # The global (n, n) float32 logits alone would take 256 KiB per device.
    assert compiled.memory_analysis().temp_size_in_bytes < n * n * 4 / 4


def test_retrieval_metrics_match_a_sorting_reference():
    img, txt = _embeddings(32, 3, seed=5)  # dim 3: many retrieval mistakes
    metrics = contrastive.retrieval_metrics(img, txt, ks=(1, 5))
    similarity = img.astype(np.float64) @ txt.astype(np.float64).T
    for direction, sims in (("image_to_text", similarity), ("text_to_image", similarity.T)):
        order = np.argsort(-sims, axis=1)
        rank = np.array([np.where(order[i] == i)[0][0] for i in range(len(sims))])
        for k in (1, 5):
            np.testing.assert_allclose(metrics[f"{direction}_recall@{k}"], np.mean(rank < k))
    assert 0 < float(metrics["image_to_text_recall@1"]) < 1


def test_retrieval_metrics_extremes():
    eye = np.eye(8, dtype=np.float32)
    perfect = contrastive.retrieval_metrics(eye, eye, ks=(1,))
    assert all(float(v) == 1.0 for v in perfect.values())
    constant = np.ones((8, 4), np.float32)
    tied = contrastive.retrieval_metrics(constant, constant, ks=(1,))
    assert all(float(v) == 0.0 for v in tied.values())


# ------------------------------------------------------------------------------------------------
# Multi-positive targets: identical captions are positives of each other
# ------------------------------------------------------------------------------------------------


def _label_tokens(labels, length=5):
    """(N, length) token ids of captions made from class labels: rows with one label are equal."""
    labels = np.asarray(labels)
    return (labels[:, None] * 7 + np.arange(length)[None, :] + 1).astype(np.int32)


def multi_positive_reference(kind, img, txt, labels, logit_scale, logit_bias=0.0):
    """Float64 multi-positive losses and their gradients (d/dimg, d/dtxt) by hand. Softmax: cross
    entropy against the uniform distribution over each row's (column's) identical captions, both
    directions; sigmoid: z_ij = +1 for identical captions."""
    img, txt = img.astype(np.float64), txt.astype(np.float64)
    same = np.equal.outer(labels, labels)
    n = len(img)
    if kind == "softmax":
        t = math.exp(min(logit_scale, math.log(100)))
        logits = t * img @ txt.T
        target = same / same.sum(axis=1, keepdims=True)  # symmetric: row and column sums agree
        loss = 0.5 * (
            np.mean(_logsumexp(logits, 1) - np.sum(target * logits, 1))
            + np.mean(_logsumexp(logits, 0) - np.sum(target * logits, 0))
        )
        d_logits = 0.5 / n * ((_softmax(logits, 1) - target) + (_softmax(logits, 0) - target))
    else:
        t = math.exp(logit_scale)
        logits = t * img @ txt.T + logit_bias
        z = np.where(same, 1.0, -1.0)
        loss = np.sum(np.log1p(np.exp(-z * logits))) / n
        d_logits = -z / (1 + np.exp(z * logits)) / n
    return loss, t * d_logits @ txt, t * d_logits.T @ img


LABELS = np.array([0, 1, 0, 2, 1, 0, 3, 2, 0, 1, 1, 4, 2, 0, 3, 0])  # 16 captions, 5 distinct


@pytest.mark.parametrize(
    "kind, logit_scale", [("softmax", 2.5), ("softmax", 6.0), ("sigmoid", 1.5)]
)
def test_multi_positive_losses_match_float64(kind, logit_scale):
    img, txt = _embeddings(16, 6, seed=11)  # random texts: identical captions, unequal embeddings
    bias = -2.0 if kind == "sigmoid" else None
    tokens = jnp.asarray(_label_tokens(LABELS))
    f = lambda i, t: contrastive.contrastive_loss(
        kind, i, t, jnp.float32(logit_scale), bias, caption_tokens=tokens
    )
    loss, (g_img, g_txt) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(img, txt)
    ref_loss, ref_img, ref_txt = multi_positive_reference(
        kind, img, txt, LABELS, logit_scale, bias or 0.0
    )
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    atol = 1e-5 * np.abs(ref_img).max()
    np.testing.assert_allclose(g_img, ref_img, rtol=1e-4, atol=atol)
    np.testing.assert_allclose(g_txt, ref_txt, rtol=1e-4, atol=atol)
    assert np.isfinite(g_img).all() and np.isfinite(g_txt).all()
    # Repeated captions change the targets, so the loss differs from the one-positive loss.
    plain = contrastive.contrastive_loss(kind, img, txt, jnp.float32(logit_scale), bias)
    assert abs(float(loss) - float(plain)) > 1e-3


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("chunked", [False, True])
def test_unique_captions_give_bitwise_the_one_positive_loss(kind, chunked):
    mesh = meshes.make_mesh({"data": 8})
    img, txt = _embeddings(32, 8, seed=12)
    neg = _hard_negatives(img, seed=13)
    tokens = _label_tokens(np.arange(32))  # every caption different
    bias = jnp.float32(-1.5) if kind == "sigmoid" else None
    scale = jnp.float32(2.3)

    def loss(tok):
        if chunked:
            return contrastive.ring_contrastive_loss(
                kind, img, txt, scale, bias, neg, tok, mesh=mesh
            )
        return contrastive.contrastive_loss(kind, img, txt, scale, bias, neg, tok)

    with_tokens = jax.jit(loss)(jnp.asarray(tokens))
    without = jax.jit(lambda: loss(None))()
    assert np.asarray(with_tokens).tobytes() == np.asarray(without).tobytes()


def test_softmax_targets_change_nothing_when_identical_captions_embed_identically():
    """A deterministic text tower embeds identical captions identically: then each row's uniform
    target over them and the one-hot target give the same loss and gradients (the ln c floor
    is the target's entropy, not a false negative). SigLIP's labels do change the loss."""
    img, _ = _embeddings(16, 6, seed=14)
    classes = np.random.default_rng(15).normal(size=(5, 6))
    txt = (classes / np.linalg.norm(classes, axis=-1, keepdims=True))[LABELS].astype(np.float32)
    tokens = jnp.asarray(_label_tokens(LABELS))
    for kind, bias, equal in (("softmax", None, True), ("sigmoid", -2.0, False)):
        f = lambda i, tok, kind=kind, bias=bias: contrastive.contrastive_loss(
            kind, i, txt, jnp.float32(2.0), bias, caption_tokens=tok
        )
        multi, g_multi = jax.value_and_grad(f)(img, tokens)
        one, g_one = jax.value_and_grad(f)(img, None)
        assert np.allclose(multi, one, rtol=1e-6) == equal
        assert np.allclose(g_multi, g_one, rtol=1e-5, atol=1e-7) == equal


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize(
    "mesh_shape, with_negatives", [({"data": 8}, False), ({"data": 2, "fsdp": 4}, True)]
)
def test_ring_multi_positive_loss_equals_global_loss(kind, mesh_shape, with_negatives):
    mesh = meshes.make_mesh(mesh_shape)
    img, txt = _embeddings(32, 8, seed=16)
    neg = _hard_negatives(img, seed=17) if with_negatives else None
    # Identical captions on different devices, and on the same device.
    tokens = _label_tokens(np.concatenate([LABELS, LABELS[::-1]]))
    img, txt, neg, tokens = (
        None if x is None else jax.device_put(x, sharding.batch_sharding(mesh))
        for x in (img, txt, neg, tokens)
    )
    scale, bias = jnp.float32(2.3), jnp.float32(-1.5)

    def ring(i, t, s, b):
        return contrastive.ring_contrastive_loss(kind, i, t, s, b, neg, tokens, mesh=mesh)

    def plain(i, t, s, b):
        return contrastive.contrastive_loss(kind, i, t, s, b, neg, tokens)

    argnums = (0, 1, 2, 3)
    ring_loss, ring_grads = jax.jit(jax.value_and_grad(ring, argnums))(img, txt, scale, bias)
    loss, grads = jax.jit(jax.value_and_grad(plain, argnums))(img, txt, scale, bias)
    np.testing.assert_allclose(ring_loss, loss, rtol=1e-5)
    for got, want in zip(ring_grads, grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


def test_caption_tokens_must_be_one_row_per_pair():
    img, txt = _embeddings(8, 4, seed=18)
    with pytest.raises(ValueError, match=r"caption_tokens must be \(batch, length\)"):
        contrastive.contrastive_loss("softmax", img, txt, 1.0, caption_tokens=np.zeros((4, 3)))


def test_retrieval_counts_an_identical_caption_as_a_hit():
    # Two classes, four images each; each image sits nearest its own class's first caption.
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    img = np.eye(2, dtype=np.float32)[labels]
    txt = img + np.float32(0.01) * np.arange(8, dtype=np.float32)[::-1, None]  # distinct scores
    captions = ["a photo of a cat" if c == 0 else "a photo of a dog" for c in labels]
    one_positive = contrastive.retrieval_metrics(img, txt, ks=(1,))
    assert float(one_positive["image_to_text_recall@1"]) < 1  # the identical caption is a miss
    for given in (captions, _label_tokens(labels)):
        metrics = contrastive.retrieval_metrics(img, txt, ks=(1,), captions=given)
        assert {k: float(v) for k, v in metrics.items()} == {
            "image_to_text_recall@1": 1.0,
            "text_to_image_recall@1": 1.0,
        }
    # A caption of the other class ranked first is still a miss, both ways.
    swapped = contrastive.retrieval_metrics(img, txt[::-1], ks=(1,), captions=captions)
    assert all(float(v) == 0.0 for v in swapped.values())


def test_retrieval_with_unique_captions_keeps_the_one_positive_numbers():
    img, txt = _embeddings(32, 3, seed=5)
    captions = [f"caption {i}" for i in range(32)]
    plain = contrastive.retrieval_metrics(img, txt, ks=(1, 5))
    given = contrastive.retrieval_metrics(img, txt, ks=(1, 5), captions=captions)
    assert {k: float(v) for k, v in given.items()} == {k: float(v) for k, v in plain.items()}
    with pytest.raises(ValueError, match="one caption per pair"):
        contrastive.retrieval_metrics(img, txt, captions=captions[:4])
