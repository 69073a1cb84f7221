"""CLIP (Radford et al. 2021): a ViT image tower and a causal text transformer whose pooled
features are linearly projected (no bias) into a shared space and L2-normalised.

Image convention: `encode_image` takes NHWC float images in [-1, 1] (the project convention)
and normalises them INSIDE the model with `config.pixel_mean` / `config.pixel_std`:
    pixels = ((images + 1) / 2 - pixel_mean) / pixel_std.
Our own models use mean = std = 0.5 (the identity on [-1, 1] images); checkpoints imported from
Hugging Face (`diffusion.hf.clip`) carry OpenAI's mean/std, so the same [-1, 1] images give the same
numbers as `transformers` on its processor-normalised pixels.

Text convention: token ids (B, L) int32 plus a mask (B, L), 1 for real tokens. The text tower
pools at the LAST unmasked position, which is the end-of-text token for CLIP tokenizers.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion import sharding
from diffusion.models import attention, blocks, embeddings, layers, patches

# ============================================================================================
# Config and variants
# ============================================================================================

VISION_POOLING = ("class", "mean")
# How the image tower turns pixels into tokens: a linear map of each patch (ViT), or 3x3
# stride-2 convolutions first (Xiao et al. 2021; patches.ConvStem).
VISION_STEMS = ("patch", "conv")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Every size and numeric choice of a CLIP model."""

    # Image tower (ViT).
    image_size: int = 32  # square input resolution in pixels
    patch_size: int = 4  # side of the square patches
    in_channels: int = 3  # image channels
    vision_width: int = 128  # residual width of the image tower
    vision_depth: int = 2  # number of image transformer blocks
    vision_heads: int = 4  # attention heads of the image tower
    vision_mlp_dim: int = 512  # hidden units of the image MLPs
    vision_pooling: str = "class"  # 'class' token (OpenAI) or 'mean' of the patch tokens
    vision_stem: str = "patch"  # 'patch' (linear patchify, OpenAI) or 'conv' (patches.ConvStem)
    # Text tower (causal transformer).
    vocab_size: int = 1000  # token vocabulary size
    context_length: int = 32  # maximum tokens per caption (position table rows)
    text_width: int = 128  # residual width of the text tower
    text_depth: int = 2  # number of text transformer blocks
    text_heads: int = 4  # attention heads of the text tower
    text_mlp_dim: int = 512  # hidden units of the text MLPs
    # Shared space and numerics.
    embed_dim: int = 128  # dimension of the shared image-text embedding space
    activation: str = "quick_gelu"  # MLP activation: 'quick_gelu' (OpenAI), 'gelu', ...
    # The text tower's MLP activation where it differs from the image tower's (None: the same);
    # Hugging Face CLIP configs may set one per tower.
    text_activation: str | None = None
    layer_norm_eps: float = 1e-5  # LayerNorm epsilon (OpenAI / HF: 1e-5)
    pixel_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # applied to (images + 1) / 2
    pixel_std: tuple[float, float, float] = (0.5, 0.5, 0.5)  # 0.5/0.5 = identity on [-1, 1]
    logit_scale_init: float = math.log(1 / 0.07)  # CLIP paper sec. 2.5
    logit_scale_max: float = math.log(100.0)  # the clamp applied whenever the scale is used
    logit_bias_init: float | None = None  # SigLIP's learnable bias b (paper: -10); None: no bias
    # Execution.
    dtype: str = "float32"  # compute dtype ('bfloat16' on TPU); params stay param_dtype
    param_dtype: str = "float32"  # parameter storage dtype
    attention_impl: str = "xla"  # 'xla' einsum softmax or 'fused' jax.nn.dot_product_attention
    remat_policy: str = "none"  # per-block rematerialisation, see blocks.REMAT_POLICIES
    scan_layers: bool = False  # nnx.scan over blocks (params get a leading 'layers' axis)

    def __post_init__(self):
        for tower, width, heads in (
            ("vision", self.vision_width, self.vision_heads),
            ("text", self.text_width, self.text_heads),
        ):
            if width % heads:
                raise ValueError(f"{tower}_width {width} is not divisible by {tower}_heads {heads}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}"
            )
        if self.vision_pooling not in VISION_POOLING:
            raise ValueError(
                f"unknown vision_pooling {self.vision_pooling!r}; valid: {VISION_POOLING}"
            )
        if self.vision_stem not in VISION_STEMS:
            raise ValueError(f"unknown vision_stem {self.vision_stem!r}; valid: {VISION_STEMS}")
        if self.vision_stem == "conv":
            patches.conv_stem_depth(self.patch_size, self.vision_width)
        if len(self.pixel_mean) != self.in_channels or len(self.pixel_std) != self.in_channels:
            raise ValueError(
                f"pixel_mean {self.pixel_mean} / pixel_std {self.pixel_std} need "
                f"{self.in_channels} entries (in_channels)"
            )
        layers.resolve_activation(self.activation)
        layers.resolve_activation(self.text_activation or self.activation)
        layers.resolve_dtype(self.dtype)
        layers.resolve_dtype(self.param_dtype)
        blocks.resolve_remat_policy(self.remat_policy)
        if self.attention_impl not in attention.ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"unknown attention_impl {self.attention_impl!r}; "
                f"valid: {attention.ATTENTION_IMPLEMENTATIONS}"
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def _openai(image_size, patch, vision_width, vision_depth, vision_heads, text_width, text_heads,
            embed_dim):  # fmt: skip
    """OpenAI CLIP ViT sizes (Radford et al. 2021, table 20): MLP ratio 4, text depth 12."""
    return dict(
        image_size=image_size,
        patch_size=patch,
        vision_width=vision_width,
        vision_depth=vision_depth,
        vision_heads=vision_heads,
        vision_mlp_dim=4 * vision_width,
        vocab_size=49408,
        context_length=77,
        text_width=text_width,
        text_depth=12,
        text_heads=text_heads,
        text_mlp_dim=4 * text_width,
        embed_dim=embed_dim,
        activation="quick_gelu",
        pixel_mean=(0.48145466, 0.4578275, 0.40821073),  # OpenAI's preprocessing constants
        pixel_std=(0.26862954, 0.26130258, 0.27577711),
    )


# One table of variants; `clip_config(name, **overrides)` builds the config.
CLIP_VARIANTS: dict[str, dict] = {
    "tiny": dict(),  # the CPU default: the dataclass defaults above
    "B/32": _openai(224, 32, 768, 12, 12, 512, 8, 512),
    "B/16": _openai(224, 16, 768, 12, 12, 512, 8, 512),
    "L/14": _openai(224, 14, 1024, 24, 16, 768, 12, 768),
    "L/14-336": _openai(336, 14, 1024, 24, 16, 768, 12, 768),
}


# ============================================================================================
# Towers
# ============================================================================================


class ResidualAttentionBlock(nnx.Module):
    """Pre-LN transformer block: x + attn(ln1(x)); x + mlp(ln2(x))."""

    def __init__(
        self, width, heads, mlp_dim, config: CLIPConfig, *, causal: bool, activation, rngs
    ):
        dtype = layers.resolve_dtype(config.dtype)
        kw = dict(dtype=dtype, param_dtype=layers.resolve_dtype(config.param_dtype), rngs=rngs)
        self.causal = causal
        self.ln1 = layers.LayerNorm(width, eps=config.layer_norm_eps, **kw)
        self.attn = attention.Attention(width, heads, implementation=config.attention_impl, **kw)
        self.ln2 = layers.LayerNorm(width, eps=config.layer_norm_eps, **kw)
        self.mlp = layers.MLP(width, mlp_dim, activation, **kw)

    def __call__(self, x: jax.Array, key_mask: jax.Array | None) -> jax.Array:
        x = sharding.with_logical_constraint(x, layers.TOKEN_AXES)
        x = x + self.attn(self.ln1(x), key_mask=key_mask, causal=self.causal)  # (B, T, W)
        x = x + self.mlp(self.ln2(x))  # (B, T, W)
        return sharding.with_logical_constraint(x, layers.TOKEN_AXES)


def _blocks(width, heads, mlp_dim, depth, config: CLIPConfig, *, causal, activation, rngs):
    return blocks.BlockStack(
        lambda r: ResidualAttentionBlock(
            width, heads, mlp_dim, config, causal=causal, activation=activation, rngs=r
        ),
        depth,
        scan_layers=config.scan_layers,
        remat_policy=config.remat_policy,
        rngs=rngs,
    )


class VisionTower(nnx.Module):
    """ViT: patches (+ class token) + learned positions -> pre-LN -> blocks -> pool -> LN."""

    def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs):
        c = config
        dtype, param_dtype = layers.resolve_dtype(c.dtype), layers.resolve_dtype(c.param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = c
        self.dtype = dtype
        scale = c.vision_width**-0.5  # OpenAI's init scale for class and position embeddings
        if c.vision_stem == "conv":
            self.patch_embed = patches.ConvStem(c.patch_size, c.in_channels, c.vision_width, **kw)
        else:
            self.patch_embed = patches.PatchEmbed(
                c.patch_size, c.in_channels, c.vision_width, use_bias=False, **kw
            )
        num_tokens = c.num_patches
        class_embedding = None
        if c.vision_pooling == "class":
            num_tokens += 1
            class_embedding = layers.make_param(
                rngs, layers.normal(scale), (c.vision_width,), ("embed",), param_dtype
            )
        self.class_embedding = nnx.data(class_embedding)
        self.position = embeddings.LearnedPositionEmbedding(
            num_tokens, c.vision_width, stddev=scale, param_dtype=param_dtype, rngs=rngs
        )
        self.pre_norm = layers.LayerNorm(c.vision_width, eps=c.layer_norm_eps, **kw)
        self.blocks = _blocks(
            c.vision_width, c.vision_heads, c.vision_mlp_dim, c.vision_depth, c,
            causal=False, activation=c.activation, rngs=rngs,
        )  # fmt: skip
        self.post_norm = layers.LayerNorm(c.vision_width, eps=c.layer_norm_eps, **kw)

    def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """pixels: normalised (B, H, W, C) -> (token states (B, T, W), pooled (B, W))."""
        x = self.patch_embed(pixels.astype(self.dtype))  # (B, N, W)
        if self.class_embedding is not None:
            cls = jnp.broadcast_to(
                self.class_embedding[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1])
            )
            x = jnp.concatenate([cls, x], axis=1)  # (B, 1 + N, W)
        x = self.pre_norm(self.position(x))  # (B, T, W)
        x = self.blocks(x, None)  # (B, T, W)
        pooled = x[:, 0] if self.class_embedding is not None else jnp.mean(x, axis=1)  # (B, W)
        return x, self.post_norm(pooled)


def last_valid_index(mask: jax.Array) -> jax.Array:
    """(B, L) mask -> (B,) index of the last truthy position (the end-of-text token)."""
    positions = jnp.arange(mask.shape[1])[None, :]
    return jnp.max(jnp.where(mask.astype(bool), positions, 0), axis=1)


class TextTower(nnx.Module):
    """Causal transformer: tokens + learned positions -> blocks -> LN; pool at end of text."""

    def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs):
        c = config
        dtype, param_dtype = layers.resolve_dtype(c.dtype), layers.resolve_dtype(c.param_dtype)
        self.dtype = dtype
        self.token_embed = embeddings.Embed(
            c.vocab_size, c.text_width, stddev=0.02, param_dtype=param_dtype, rngs=rngs
        )
        self.position = embeddings.LearnedPositionEmbedding(
            c.context_length, c.text_width, stddev=0.01, param_dtype=param_dtype, rngs=rngs
        )
        self.blocks = _blocks(
            c.text_width, c.text_heads, c.text_mlp_dim, c.text_depth, c,
            causal=True, activation=c.text_activation or c.activation, rngs=rngs,
        )  # fmt: skip
        self.final_norm = layers.LayerNorm(
            c.text_width, eps=c.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens (B, L) -> the input layer's word embeddings + positions (B, L, W)."""
        return self.position(self.token_embed(tokens).astype(self.dtype))

    def __call__(self, tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """tokens, mask: (B, L) -> (token states (B, L, W), pooled (B, W))."""
        x = self.blocks(self.embed(tokens), mask)  # (B, L, W)
        x = self.final_norm(x)
        pooled = jnp.take_along_axis(x, last_valid_index(mask)[:, None, None], axis=1)[:, 0]
        return x, pooled  # (B, L, W), (B, W)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


# ============================================================================================
# CLIP
# ============================================================================================


def _concrete(x) -> np.ndarray | None:
    """x as numpy when its values are known (eager call), None under a jax trace."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


class CLIP(nnx.Module):
    """Image tower, text tower, bias-free projections into the shared space, logit scale."""

    def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs):
        c = config
        param_dtype = layers.resolve_dtype(c.param_dtype)
        self.config = c
        self.vision = VisionTower(c, rngs=rngs)
        self.text = TextTower(c, rngs=rngs)
        kw = dict(use_bias=False, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
        self.vision_projection = layers.Dense(
            c.vision_width, c.embed_dim, ("embed", "projection"),
            kernel_init=layers.normal(c.vision_width**-0.5), **kw,
        )  # fmt: skip
        self.text_projection = layers.Dense(
            c.text_width, c.embed_dim, ("embed", "projection"),
            kernel_init=layers.normal(c.text_width**-0.5), **kw,
        )  # fmt: skip
        self.logit_scale = layers.make_param(
            rngs, nnx.initializers.constant(c.logit_scale_init), (), (), param_dtype
        )
        if c.logit_bias_init is not None:  # only models trained with the sigmoid loss have it
            self.logit_bias = layers.make_param(
                rngs, nnx.initializers.constant(c.logit_bias_init), (), (), param_dtype
            )

    # -- input checks (shapes are static even under jit; ids only when concrete) -------------

    def check_images(self, images: jax.Array) -> None:
        c = self.config
        if images.ndim != 4 or images.shape[-1] != c.in_channels:
            raise ValueError(
                f"images must be NHWC with {c.in_channels} channels, got shape {images.shape}"
            )
        h, w = images.shape[1:3]
        if h % c.patch_size or w % c.patch_size:
            raise ValueError(
                f"image size {h}x{w} cannot be cut into {c.patch_size}x{c.patch_size} patches; "
                f"this variant expects {c.image_size}x{c.image_size} images"
            )
        if (h, w) != (c.image_size, c.image_size):
            raise ValueError(
                f"image size {h}x{w} does not match the variant's {c.image_size}x{c.image_size} "
                "(its position table has one row per patch); resize the images"
            )

    def check_tokens(self, tokens: jax.Array, mask: jax.Array) -> None:
        c = self.config
        if tokens.ndim != 2 or tokens.shape != mask.shape:
            raise ValueError(
                f"tokens {tokens.shape} and mask {mask.shape} must both be (batch, length)"
            )
        if tokens.shape[1] > c.context_length:
            raise ValueError(
                f"{tokens.shape[1]} tokens exceed the context length {c.context_length}; "
                "truncate or pad captions to at most that many tokens"
            )
        ids = _concrete(tokens)
        if ids is not None and ids.size and (ids.min() < 0 or ids.max() >= c.vocab_size):
            bad = ids[(ids < 0) | (ids >= c.vocab_size)]
            raise ValueError(
                f"token id {int(bad[0])} is outside the vocabulary [0, {c.vocab_size}); "
                "use the tokenizer that matches this model"
            )

    # -- public API --------------------------------------------------------------------------

    def normalize_pixels(self, images: jax.Array) -> jax.Array:
        """[-1, 1] images -> the pixel normalisation the towers were trained with."""
        mean = jnp.asarray(self.config.pixel_mean, jnp.float32)
        std = jnp.asarray(self.config.pixel_std, jnp.float32)
        return ((images.astype(jnp.float32) + 1.0) / 2.0 - mean) / std

    def image_features(self, images: jax.Array) -> jax.Array:
        """(B, H, W, C) in [-1, 1] -> projected, unnormalised image features (B, E)."""
        self.check_images(images)
        _, pooled = self.vision(self.normalize_pixels(images))
        return self.vision_projection(pooled.astype(jnp.float32))

    def encode_image(self, images: jax.Array) -> jax.Array:
        """(B, H, W, C) in [-1, 1] -> L2-normalised image embeddings (B, E) float32."""
        return l2_normalize(self.image_features(images))

    def text_states(
        self, tokens: jax.Array, mask: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Conditioning for the DiT: (token states (B, L, text_width) after the final LN,
        pooled = projected, unnormalised end-of-text embedding (B, embed_dim))."""
        mask = jnp.ones_like(tokens) if mask is None else mask
        self.check_tokens(tokens, mask)
        states, pooled = self.text(tokens, mask)
        return states, self.text_projection(pooled.astype(jnp.float32))

    def word_embeddings(self, tokens: jax.Array) -> jax.Array:
        """(B, L) ids -> the text tower's input layer (B, L, text_width): what the DiT's
        `word_conditioning` reads beside the final states of `text_states`."""
        return self.text.embed(tokens)

    def encode_text(self, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """(B, L) ids + mask -> L2-normalised text embeddings (B, E) float32."""
        return l2_normalize(self.text_states(tokens, mask)[1])

    def logit_scale_exp(self) -> jax.Array:
        """exp(logit_scale) with the logit scale clamped at logit_scale_max (ln 100)."""
        return jnp.exp(jnp.minimum(self.logit_scale[...], self.config.logit_scale_max))

    def __call__(
        self, images: jax.Array, tokens: jax.Array, mask: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """-> (image embeddings (B, E), text embeddings (B, E), clamped exp(logit scale))."""
        return self.encode_image(images), self.encode_text(tokens, mask), self.logit_scale_exp()
