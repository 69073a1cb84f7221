"""Contrastive image-text losses over the GLOBAL batch, a ring-chunked variant, retrieval metrics.

Conventions: ``image_embeddings`` and ``text_embeddings`` are ``(N, D)`` and L2-normalised (the
towers normalise); row ``i`` of each is a matching pair. ``logit_scale`` is the LOG temperature
(a learnable scalar); the temperature used is ``exp(min(logit_scale, ln 100))``.

Hard negative captions (NegCLIP, Yuksekgonul et al. 2023): ``negative_text_embeddings`` ``(N, D)``
holds, in row ``i``, a caption that must NOT match image ``i`` (its own caption with one word
swapped). Each image is scored against it as one more candidate beside the ``N`` captions (an
extra column of its own row, so the term stays local to the image's device); the captions'
side of the loss is unchanged, since a swapped caption has no image of its own.

Multi-positive targets (``caption_tokens``, ``(N, L)`` token ids): in a labelled dataset whose
captions are made from class names, many pairs share one caption. With ``caption_tokens`` every
pair whose token ids are identical is a positive: the softmax target of a row is uniform over its
``c`` positives (cross entropy against that distribution, both directions; as in the
multi-positive loss of SupCon, Khosla et al. 2020, eq. 2), and SigLIP labels such pairs
``z = +1``. Identical ids are what the towers see (a caption cut at the context is the same input
as any other with that prefix). A batch of unique captions gives bitwise the loss without them:
the extra positives add exact zeros. Two consequences worth knowing: the softmax loss of a row
with ``c`` identical captions cannot go below ``ln c``, the entropy of its target, with either
target; and when the text tower embeds identical captions identically (it is deterministic), the
one-hot and the uniform softmax targets give the same loss and gradients, so the change matters
for SigLIP (whose one-positive labels ask an image to match and not match one embedding) and
for captions whose embeddings differ (e.g. a stochastic text tower).

Global batch: under ``jax.jit`` a jax.Array sharded over the batch axes IS the global batch, so
the plain formulas below already compare every image with every caption on every device, and
``jax.grad`` of them is the exact gradient. No all-gather with extra averaging or gradient scaling
is needed (open_clip #616 had a world-size factor from doing both).

:func:`ring_contrastive_loss` computes the same values and gradients without ever forming the
``N x N`` logit matrix: inside ``shard_map`` each device keeps its image chunk and passes text
chunks around a ring with ``jax.lax.ppermute`` (as in big_vision's chunked SigLIP loss and
clip-jax), accumulating log-sum-exps for both directions.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from diffusion.errors import UserError

CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP (Radford et al. 2021): tau = 0.07 at init.
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the temperature at 100.
SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)  # SigLIP (Zhai et al. 2023): t' = ln 10 at init.
SIGLIP_INIT_LOGIT_BIAS = -10.0  # SigLIP: b = -10 at init.
LOSS_KINDS = ("softmax", "sigmoid")


def clamp_logit_scale(logit_scale: jax.Array, max_value: float = MAX_LOGIT_SCALE) -> jax.Array:
    """``min(logit_scale, ln 100)``; also usable on the parameter after an optimizer step."""
    return jnp.minimum(logit_scale, max_value)


def _temperature(logit_scale: jax.Array) -> jax.Array:
    return jnp.exp(clamp_logit_scale(jnp.asarray(logit_scale, jnp.float32)))


def _check_pair(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    negative_text_embeddings: jax.Array | None = None,
) -> None:
    if image_embeddings.ndim != 2 or image_embeddings.shape != text_embeddings.shape:
        raise UserError(
            "image and text embeddings must both be (batch, dim) with equal shapes; got "
            f"{image_embeddings.shape} and {text_embeddings.shape}"
        )
    if (
        negative_text_embeddings is not None
        and negative_text_embeddings.shape != text_embeddings.shape
    ):
        raise UserError(
            "negative text embeddings must be (batch, dim) like the text embeddings, one hard "
            f"negative caption per image; got {negative_text_embeddings.shape} and "
            f"{text_embeddings.shape}"
        )


def _own_negative_logits(
    image_embeddings: jax.Array, negative_text_embeddings: jax.Array, logit_scale: jax.Array
) -> jax.Array:
    """``exp(logit_scale) * img_i . neg_i`` in float32, ``(N,)``: each image's own negative."""
    img = image_embeddings.astype(jnp.float32)
    neg = negative_text_embeddings.astype(jnp.float32)
    return _temperature(logit_scale) * jnp.sum(img * neg, axis=-1)


def same_caption(row_tokens: jax.Array, column_tokens: jax.Array) -> jax.Array:
    """``(n_row, n_col)`` bool: whether caption ``i`` of the rows and ``j`` of the columns have
    identical token ids (``(n, L)`` each)."""
    return jnp.all(row_tokens[:, None, :] == column_tokens[None, :, :], axis=-1)


def _check_tokens(caption_tokens: jax.Array | None, batch: int) -> None:
    if caption_tokens is not None and (
        caption_tokens.ndim != 2 or caption_tokens.shape[0] != batch
    ):
        raise UserError(
            f"caption_tokens must be (batch, length) token ids, one caption per pair of the "
            f"batch of {batch}; got shape {caption_tokens.shape}"
        )


def _multi_positive_logits(logits: jax.Array, same: jax.Array, own: jax.Array) -> jax.Array:
    """Mean logit of each row over its positives: ``own`` (the pair's own logit, ``(n,)``) and
    the entries of ``logits`` where ``same`` (the row's identical captions) is true, the diagonal
    excluded. ``own + 0`` is ``own`` exactly, so unique captions keep the plain loss bitwise."""
    others = same & ~jnp.eye(*same.shape, dtype=bool)
    extra = jnp.sum(jnp.where(others, logits, 0.0), axis=1)
    count = 1.0 + jnp.sum(others, axis=1, dtype=logits.dtype)
    return (own + extra) / count


def pairwise_logits(
    image_embeddings: jax.Array, text_embeddings: jax.Array, logit_scale: jax.Array
) -> jax.Array:
    """``exp(logit_scale) * img @ txt.T`` in float32, ``(N_img, N_txt)``."""
    img = image_embeddings.astype(jnp.float32)
    txt = text_embeddings.astype(jnp.float32)
    return _temperature(logit_scale) * (img @ txt.T)


def clip_softmax_loss(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    logit_scale: jax.Array,
    negative_text_embeddings: jax.Array | None = None,
    caption_tokens: jax.Array | None = None,
) -> jax.Array:
    """Symmetric cross entropy of CLIP (Radford et al. 2021, Fig. 3 pseudo-code).

    ``L = (CE(logits, diag) + CE(logits.T, diag)) / 2`` with mean over the N rows; with hard
    negatives, row ``i`` of the image side has the extra logit ``t img_i . neg_i``. With
    ``caption_tokens`` the target of row ``i`` is uniform over the ``c_i`` captions identical to
    its own: ``CE = lse_i - (1/c_i) sum_{j ~ i} logits_ij`` (the relation is symmetric, so the
    columns use the same mean).
    """
    _check_pair(image_embeddings, text_embeddings, negative_text_embeddings)
    _check_tokens(caption_tokens, image_embeddings.shape[0])
    logits = pairwise_logits(image_embeddings, text_embeddings, logit_scale)  # (N, N)
    image_positives = text_positives = jnp.diagonal(logits)  # (N,)
    if caption_tokens is not None:
        same = same_caption(caption_tokens, caption_tokens)  # (N, N), symmetric
        own = image_positives
        image_positives = _multi_positive_logits(logits, same, own)
        text_positives = _multi_positive_logits(logits.T, same, own)
    image_lse = jax.nn.logsumexp(logits, axis=1)
    if negative_text_embeddings is not None:
        negatives = _own_negative_logits(image_embeddings, negative_text_embeddings, logit_scale)
        image_lse = jnp.logaddexp(image_lse, negatives)
    image_to_text = image_lse - image_positives
    text_to_image = jax.nn.logsumexp(logits, axis=0) - text_positives
    return 0.5 * (jnp.mean(image_to_text) + jnp.mean(text_to_image))


def siglip_sigmoid_loss(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    logit_scale: jax.Array,
    logit_bias: jax.Array,
    negative_text_embeddings: jax.Array | None = None,
    caption_tokens: jax.Array | None = None,
) -> jax.Array:
    """Pairwise sigmoid loss of SigLIP (Zhai et al. 2023, eq. 1 / Algorithm 1).

    ``L = -(1/N) sum_i sum_j log sigmoid(z_ij (t x_i . y_j + b))``, ``z_ij = 1`` if ``i == j``
    else ``-1``, ``t = exp(logit_scale)``; with hard negatives, each image adds the negative
    pair ``-log sigmoid(-(t x_i . neg_i + b))``. With ``caption_tokens``, ``z_ij = 1`` also where
    captions ``i`` and ``j`` have identical token ids.
    """
    _check_pair(image_embeddings, text_embeddings, negative_text_embeddings)
    _check_tokens(caption_tokens, image_embeddings.shape[0])
    logits = pairwise_logits(image_embeddings, text_embeddings, logit_scale) + logit_bias
    n = logits.shape[0]
    positive = jnp.eye(n, dtype=bool)
    if caption_tokens is not None:
        positive = positive | same_caption(caption_tokens, caption_tokens)
    signs = jnp.where(positive, 1.0, -1.0).astype(logits.dtype)  # +1 on pairs, -1 elsewhere
    total = -jnp.sum(jax.nn.log_sigmoid(signs * logits))
    if negative_text_embeddings is not None:
        negatives = _own_negative_logits(image_embeddings, negative_text_embeddings, logit_scale)
        total = total - jnp.sum(jax.nn.log_sigmoid(-(negatives + logit_bias)))
    return total / n


def contrastive_loss(
    kind: str,
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    logit_scale: jax.Array,
    logit_bias: jax.Array | None = None,
    negative_text_embeddings: jax.Array | None = None,
    caption_tokens: jax.Array | None = None,
) -> jax.Array:
    """Dispatches to :func:`clip_softmax_loss` (``'softmax'``) or :func:`siglip_sigmoid_loss`;
    ``caption_tokens`` (or None): multi-positive targets for identical captions (module doc)."""
    negatives = negative_text_embeddings
    if kind == "softmax":
        return clip_softmax_loss(
            image_embeddings, text_embeddings, logit_scale, negatives, caption_tokens
        )
    if kind == "sigmoid":
        if logit_bias is None:
            raise UserError("the 'sigmoid' (SigLIP) loss needs logit_bias; got None")
        return siglip_sigmoid_loss(
            image_embeddings, text_embeddings, logit_scale, logit_bias, negatives, caption_tokens
        )
    raise UserError(f"unknown contrastive loss kind {kind!r}; valid: {LOSS_KINDS}")


# ------------------------------------------------------------------------------------------------
# Ring-chunked variant
# ------------------------------------------------------------------------------------------------


def _ring_softmax_partial_sum(img, txt, tok, neg, scale, axis_name, num_devices):
    """Local sum over this device's rows of both CE terms; text chunks (with their caption token
    ids ``tok``, or None) travel the ring. The own hard negatives ``neg`` (or None) sit beside
    their images and never travel."""
    perm = [(i, (i + 1) % num_devices) for i in range(num_devices)]
    positives = scale * jnp.sum(img * txt, axis=-1)  # (n,)

    def block_terms(txt_chunk, tok_chunk, home):
        logits = scale * (img @ txt_chunk.T)  # (n_img, n_txt)
        lses = jax.nn.logsumexp(logits, axis=1), jax.nn.logsumexp(logits, axis=0)
        if tok_chunk is None:
            return lses, None
        same = same_caption(tok, tok_chunk)  # identical captions other than the pair itself
        if home:
            same = same & ~jnp.eye(*same.shape, dtype=bool)
        sums = jnp.sum(jnp.where(same, logits, 0.0), axis=1), jnp.sum(same, 1, logits.dtype)
        return lses, sums

    # Keep only the carry per ring step; recompute the (n, n) block backwards.
    home_block = jax.checkpoint(functools.partial(block_terms, home=True))
    away_block = jax.checkpoint(functools.partial(block_terms, home=False))
    (image_lse, text_lse), positive_sums = home_block(txt, tok)

    def ring_step(carry, _):
        txt_chunk, tok_chunk, chunk_text_lse, image_lse, positive_sums = carry
        # The text chunk carries its own running log-sum-exp over the images it has visited.
        txt_chunk, tok_chunk, chunk_text_lse = jax.lax.ppermute(
            (txt_chunk, tok_chunk, chunk_text_lse), axis_name, perm
        )
        (block_image_lse, block_text_lse), block_sums = away_block(txt_chunk, tok_chunk)
        image_lse = jnp.logaddexp(image_lse, block_image_lse)
        chunk_text_lse = jnp.logaddexp(chunk_text_lse, block_text_lse)
        positive_sums = jax.tree.map(jnp.add, positive_sums, block_sums)
        return (txt_chunk, tok_chunk, chunk_text_lse, image_lse, positive_sums), None

    carry = (txt, tok, text_lse, image_lse, positive_sums)
    (_, _, text_lse, image_lse, positive_sums), _ = jax.lax.scan(
        ring_step, carry, None, length=num_devices - 1
    )
    # After P-1 hops device k holds chunk k+1's log-sum-exp: one more hop sends it home.
    text_lse = jax.lax.ppermute(text_lse, axis_name, perm)
    if neg is not None:
        image_lse = jnp.logaddexp(image_lse, scale * jnp.sum(img * neg, axis=-1))
    if tok is not None:
        extra, count = positive_sums
        positives = (positives + extra) / (1.0 + count)  # mean logit over each row's positives
    # Identical captions are an equivalence, so every positive pair (i, j) has c_i = c_j and the
    # column means of the text side sum to the same total as these row means.
    return jnp.sum(image_lse - positives) + jnp.sum(text_lse - positives)


def _ring_sigmoid_partial_sum(img, txt, tok, neg, scale, bias, axis_name, num_devices):
    """Local sum of -log sigmoid(z * logit) over this device's images and all texts (and each
    image's own hard negative ``neg``, or None); ``tok`` (or None): caption token ids, whose
    identical pairs are labelled ``z = +1``."""
    perm = [(i, (i + 1) % num_devices) for i in range(num_devices)]
    n = img.shape[0]

    def signs_of(tok_chunk, home):
        positive = jnp.eye(n, dtype=bool) if home else jnp.zeros((n, n), bool)
        if tok_chunk is not None:
            positive = positive | same_caption(tok, tok_chunk)
        return jnp.where(positive, 1.0, -1.0).astype(img.dtype)

    @jax.checkpoint
    def block_loss(txt_chunk, signs):
        logits = scale * (img @ txt_chunk.T) + bias  # (n_img, n_txt)
        return -jnp.sum(jax.nn.log_sigmoid(signs * logits))

    total = block_loss(txt, signs_of(tok, home=True))  # the pairs on the diagonal

    def ring_step(carry, _):
        txt_chunk, tok_chunk, total = carry
        txt_chunk, tok_chunk = jax.lax.ppermute((txt_chunk, tok_chunk), axis_name, perm)
        total = total + block_loss(txt_chunk, signs_of(tok_chunk, home=False))
        return (txt_chunk, tok_chunk, total), None

    (_, _, total), _ = jax.lax.scan(ring_step, (txt, tok, total), None, length=num_devices - 1)
    if neg is not None:
        total = total - jnp.sum(jax.nn.log_sigmoid(-(scale * jnp.sum(img * neg, axis=-1) + bias)))
    return total


def ring_contrastive_loss(
    kind: str,
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    logit_scale: jax.Array,
    logit_bias: jax.Array | None = None,
    negative_text_embeddings: jax.Array | None = None,
    caption_tokens: jax.Array | None = None,
    *,
    mesh: Mesh,
    batch_axes: Sequence[str] = ("data", "fsdp"),
) -> jax.Array:
    """Same value and gradient as :func:`contrastive_loss`, computed chunk by chunk on a ring.

    The batch dimension is split over ``batch_axes`` of ``mesh`` (axes absent from the mesh are
    skipped); each device only ever holds ``(N/P) x (N/P)`` logits. Call it under ``jax.jit``.
    The batch size must be divisible by the number of devices on the batch axes.
    """
    _check_pair(image_embeddings, text_embeddings, negative_text_embeddings)
    _check_tokens(caption_tokens, image_embeddings.shape[0])
    if kind not in LOSS_KINDS:
        raise UserError(f"unknown contrastive loss kind {kind!r}; valid: {LOSS_KINDS}")
    if kind == "sigmoid" and logit_bias is None:
        raise UserError("the 'sigmoid' (SigLIP) loss needs logit_bias; got None")
    axes = tuple(a for a in batch_axes if a in mesh.shape)
    num_devices = math.prod(mesh.shape[a] for a in axes)
    batch = image_embeddings.shape[0]
    if batch % num_devices:
        raise UserError(
            f"batch size {batch} is not divisible by the {num_devices} devices on mesh axes "
            f"{axes}; use a multiple of {num_devices}"
        )
    if num_devices == 1:
        return contrastive_loss(
            kind,
            image_embeddings,
            text_embeddings,
            logit_scale,
            logit_bias,
            negative_text_embeddings,
            caption_tokens,
        )

    scale = _temperature(logit_scale)
    bias = (
        jnp.zeros((), jnp.float32) if logit_bias is None else jnp.asarray(logit_bias, jnp.float32)
    )
    rows = PartitionSpec(axes, None)
    texts = (text_embeddings,)
    if negative_text_embeddings is not None:
        texts += (negative_text_embeddings,)

    tokens = () if caption_tokens is None else (caption_tokens,)

    @functools.partial(
        jax.shard_map,
        mesh=mesh,
        in_specs=(
            rows,
            (rows,) * len(texts),
            (rows,) * len(tokens),
            PartitionSpec(),
            PartitionSpec(),
        ),
        out_specs=PartitionSpec(),
    )
    def sharded_loss(img, texts, tokens, scale, bias):
        img, txt = img.astype(jnp.float32), texts[0].astype(jnp.float32)
        neg = texts[1].astype(jnp.float32) if len(texts) > 1 else None
        tok = tokens[0] if tokens else None
        if kind == "softmax":
            partial = _ring_softmax_partial_sum(img, txt, tok, neg, scale, axes, num_devices)
            return jax.lax.psum(partial, axes) / (2 * batch)
        partial = _ring_sigmoid_partial_sum(img, txt, tok, neg, scale, bias, axes, num_devices)
        return jax.lax.psum(partial, axes) / batch

    return sharded_loss(image_embeddings, texts, tokens, scale, bias)


# ------------------------------------------------------------------------------------------------
# Retrieval metrics
# ------------------------------------------------------------------------------------------------


def caption_groups(captions) -> np.ndarray:
    """(N,) int: the same number for identical captions, given as N strings or as (N, L) token
    ids (identical rows)."""
    if isinstance(captions, list | tuple) and all(isinstance(c, str) for c in captions):
        return np.unique(np.asarray(captions, dtype=object), return_inverse=True)[1].ravel()
    rows = np.asarray(captions)
    if rows.ndim != 2:
        raise UserError(
            "captions must be N strings or (N, length) token ids; got an array of shape "
            f"{rows.shape}"
        )
    return np.unique(rows, axis=0, return_inverse=True)[1].ravel()


def _rank_of_match(similarity: jax.Array, same: jax.Array) -> jax.Array:
    """0-based rank of each row's best positive (``same``: the row's query and that candidate
    share a caption; the diagonal always does) among the row's other candidates; ties count
    against the match."""
    best_positive = jnp.max(jnp.where(same, similarity, -jnp.inf), axis=1, keepdims=True)
    return jnp.sum((similarity >= best_positive) & ~same, axis=1)  # (N,)


def retrieval_metrics(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    ks: Sequence[int] = (1, 5),
    captions=None,
) -> dict[str, jax.Array]:
    """Recall@k both ways for matched pairs (row i of each side belongs together).

    Returns ``{'image_to_text_recall@k': ..., 'text_to_image_recall@k': ...}`` for each ``k``
    (``recall@1`` is top-1 accuracy), fractions in [0, 1]. A tie with a wrong item counts as a
    miss, so a constant embedding scores 0, not 1. ``captions`` (N strings or (N, L) token ids,
    or None): a retrieved item whose caption is identical to the true partner's is a hit too,
    both ways (in a labelled dataset many images share a caption); None: only the partner is.
    """
    _check_pair(image_embeddings, text_embeddings)
    n = image_embeddings.shape[0]
    if captions is None:
        same = np.eye(n, dtype=bool)
    else:
        groups = caption_groups(captions)
        if groups.shape != (n,):
            raise UserError(f"retrieval needs one caption per pair ({n}); got {len(groups)}")
        same = groups[:, None] == groups[None, :]  # (N, N), symmetric
    similarity = image_embeddings.astype(jnp.float32) @ text_embeddings.astype(jnp.float32).T
    ranks = {
        "image_to_text": _rank_of_match(similarity, same),
        "text_to_image": _rank_of_match(similarity.T, same),
    }
    return {
        f"{direction}_recall@{k}": jnp.mean(rank < k)
        for direction, rank in ranks.items()
        for k in ks
    }
