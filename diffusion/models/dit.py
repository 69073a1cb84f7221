"""DiT: Scalable Diffusion Models with Transformers (Peebles & Xie 2023), text-conditioned.

Follows facebookresearch/DiT `models.py`: patchify -> fixed 2-D sin-cos positions -> adaLN-Zero
blocks conditioned on the time embedding (+ pooled text or class embedding) -> final adaLN
layer -> unpatchify (-> optionally U-ViT's 3x3 convolution). For text conditioning every block
also cross-attends from the image tokens to the text token states (with the text padding mask),
as PixArt-alpha does.

Time: continuous t in [0, 1] with t = 1 pure noise, embedded as `timestep_embedding(t *
time_scale)` (time_scale 1000), so DDPM (t = step / (T - 1)) and flow matching share the model.

Conditioning modes: 'text' (context (B, L, context_dim), its mask, pooled (B, pooled_dim); with
`word_conditioning` also the text tower's word embeddings (B, L, context_dim)),
'class' (labels (B,) in [0, num_classes], num_classes being the null class for classifier-free
guidance as in DiT's LabelEmbedder) and 'none'.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion import sharding
from diffusion.models import attention, blocks, embeddings, layers, patches

CONDITIONING = ("text", "class", "none")
INPUT_STEMS = ("patch", "conv")  # DiTConfig.input_stem


# ============================================================================================
# Config and variants
# ============================================================================================


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Every size and numeric choice of a DiT."""

    in_channels: int = 3  # channels of the (latent) image
    patch_size: int = 4  # side of the square patches
    width: int = 128  # hidden size D
    depth: int = 4  # number of DiT blocks
    num_heads: int = 4  # attention heads
    mlp_ratio: float = 4.0  # MLP hidden units = mlp_ratio * width
    learn_sigma: bool = False  # output 2 x in_channels (prediction + variance interpolation)
    conditioning: str = "text"  # 'text', 'class' or 'none'
    context_dim: int = 128  # width of the text token states (CLIP text_width)
    pooled_dim: int = 128  # width of the pooled text embedding (CLIP embed_dim)
    num_classes: int = 1000  # class-conditional mode: labels 0..num_classes-1, +1 null class
    condition_init_std: float = 1.0  # std of conditioning embeddings at init (see below)
    # Text mode: also condition on the text tower's word embeddings (its input layer), beside
    # its final states: cross-attention sees both, and their masked mean joins the pooled
    # embedding in adaLN. A small contrastive tower keeps in its output only what told its
    # batches apart; its input layer still names every word (docs/default_recipe.md).
    word_conditioning: bool = False
    # A 3x3 convolution on the unpatchified output (U-ViT), identity at init: output pixels
    # mix across patch borders, which the per-patch linear decoder cannot (seams, outlines).
    output_conv: bool = False
    # How noisy pixels become tokens: 'patch' (DiT's linear patchify) or 'conv' (3x3 stride-2
    # convolutions first, patches.ConvStem; tokens then see across patch borders).
    input_stem: str = "patch"
    time_scale: float = 1000.0  # t in [0, 1] is embedded as t * time_scale
    frequency_dim: int = 256  # sinusoidal frequencies of the timestep embedding
    norm_eps: float = 1e-6  # LayerNorm epsilon (DiT)
    dtype: str = "float32"  # compute dtype ('bfloat16' on TPU); params stay param_dtype
    param_dtype: str = "float32"  # parameter storage dtype
    attention_impl: str = "xla"  # 'xla' einsum softmax or 'fused' jax.nn.dot_product_attention
    remat_policy: str = "none"  # per-block rematerialisation, see blocks.REMAT_POLICIES
    scan_layers: bool = False  # nnx.scan over blocks (params get a leading 'layers' axis)

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.width % 4:
            raise ValueError(f"width {self.width} must be divisible by 4 (2-D sin-cos positions)")
        if self.input_stem not in INPUT_STEMS:
            raise ValueError(f"unknown input_stem {self.input_stem!r}; valid: {INPUT_STEMS}")
        if self.input_stem == "conv":
            patches.conv_stem_depth(self.patch_size, self.width)
        if self.conditioning not in CONDITIONING:
            raise ValueError(f"unknown conditioning {self.conditioning!r}; valid: {CONDITIONING}")
        layers.resolve_dtype(self.dtype)
        layers.resolve_dtype(self.param_dtype)
        blocks.resolve_remat_policy(self.remat_policy)
        if self.attention_impl not in attention.ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"unknown attention_impl {self.attention_impl!r}; "
                f"valid: {attention.ATTENTION_IMPLEMENTATIONS}"
            )

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels


_DIT_SIZES = {  # DiT paper, table 1: (width, depth, heads)
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}

# One table of variants; `dit_config(name, **overrides)` builds the config. The paper's models
# are latent (4 channels), class-conditional with learned sigma: pass those as overrides.
DIT_VARIANTS: dict[str, dict] = {
    "tiny": dict(),  # the CPU default: the dataclass defaults above
    **{
        f"DiT-{size}/{patch}": dict(width=w, depth=d, num_heads=h, patch_size=patch)
        for size, (w, d, h) in _DIT_SIZES.items()
        for patch in (2, 4, 8)
    },
}


# ============================================================================================
# Embedders
# ============================================================================================


class TimestepEmbedder(nnx.Module):
    """Sinusoidal frequencies of t * time_scale -> Dense -> SiLU -> Dense (DiT)."""

    def __init__(self, config: DiTConfig, *, dtype, param_dtype, rngs):
        self.frequency_dim = config.frequency_dim
        self.time_scale = config.time_scale
        kw = dict(kernel_init=layers.normal(0.02), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = layers.Dense(config.frequency_dim, config.width, ("mlp", "embed"), **kw)
        self.fc2 = layers.Dense(config.width, config.width, ("mlp", "embed"), **kw)

    def __call__(self, t: jax.Array) -> jax.Array:
        freqs = embeddings.timestep_embedding(t * self.time_scale, self.frequency_dim)  # (B, F)
        return self.fc2(jax.nn.silu(self.fc1(freqs)))  # (B, D)


class ConditionProjection(nnx.Module):
    """Parameter-free LayerNorm then Dense(in -> D) whose outputs start with std ~ target_std.

    Normalising first makes the scale independent of which text tower produced the input.
    The target std is ~ 1 rather than DiT's 0.02: embeddings that started small left the
    conditioning drowned by the time embedding it is added to (seen in this project's prototype).
    """

    def __init__(self, in_features, width, target_std, *, dtype, param_dtype, rngs):
        self.norm = layers.LayerNorm(in_features, affine=False, eps=1e-6, dtype=dtype)
        self.proj = layers.Dense(
            in_features,
            width,
            ("mlp", "embed"),
            kernel_init=layers.normal(target_std / in_features**0.5),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(self.norm(x))


# ============================================================================================
# adaLN modulation (DiT sec. 3.2)
# ============================================================================================


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN: x * (1 + scale) + shift, with (B, D) shift/scale broadcast over tokens."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class AdaLNModulation(nnx.Module):
    """SiLU -> Dense(width -> n * width), zero-initialised (adaLN-Zero): returns n (B, width)."""

    def __init__(
        self, width: int, num_chunks: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs
    ):
        self.num_chunks = num_chunks
        self.linear = layers.Dense(
            width,
            num_chunks * width,
            ("embed", "mlp"),
            kernel_init=layers.zeros,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, condition: jax.Array) -> tuple[jax.Array, ...]:
        """condition: (B, width) -> num_chunks arrays (B, width)."""
        chunks = jnp.split(self.linear(jax.nn.silu(condition)), self.num_chunks, axis=-1)
        # Each chunk shifts, scales or gates the residual stream, so it takes the stream's layout:
        # batch split, width whole. Left free, it inherits the kernel's 'mlp' (tensor) split of
        # the n * D outputs, and XLA (seen with jax 0.10.2, Shardy and GSPMD alike) then
        # partitions `gate * attn(h)` / `gate * mlp(h)` wrongly on a data x fsdp x tensor mesh:
        # the dot before the gate gets a collective-permute that swaps batch shards between
        # devices. Guarded by tests/test_dit.py::test_gradients_on_a_data_fsdp_tensor_mesh_equal_...
        return tuple(
            sharding.with_logical_constraint(chunk, ("activation_batch", "activation_embed"))
            for chunk in chunks
        )


# ============================================================================================
# Blocks
# ============================================================================================


class DiTBlock(nnx.Module):
    """adaLN-Zero block (DiT fig. 3), plus cross-attention to text between attention and MLP.

    x = x + gate_msa * attn(modulate(norm1(x), shift_msa, scale_msa))
    x = x + cross_attn(norm_cross(x), text)          # text mode; output projection zero-init
    x = x + gate_mlp * mlp(modulate(norm2(x), shift_mlp, scale_mlp))
    """

    def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs):
        dtype = layers.resolve_dtype(config.dtype)
        kw = dict(dtype=dtype, param_dtype=layers.resolve_dtype(config.param_dtype))
        width, heads = config.width, config.num_heads
        self.norm1 = layers.LayerNorm(width, eps=config.norm_eps, affine=False, **kw)
        self.attn = attention.Attention(
            width, heads, implementation=config.attention_impl, rngs=rngs, **kw
        )
        norm_cross = cross_attn = None
        if config.conditioning == "text":
            norm_cross = layers.LayerNorm(width, eps=config.norm_eps, rngs=rngs, **kw)
            cross_attn = attention.Attention(
                width,
                heads,
                zero_output=True,  # the block starts as the identity (adaLN-Zero spirit)
                implementation=config.attention_impl,
                rngs=rngs,
                **kw,
            )
        self.norm_cross, self.cross_attn = nnx.data(norm_cross), nnx.data(cross_attn)
        self.norm2 = layers.LayerNorm(width, eps=config.norm_eps, affine=False, **kw)
        hidden = int(width * config.mlp_ratio)
        self.mlp = layers.MLP(width, hidden, "gelu_tanh", rngs=rngs, **kw)
        self.modulation = AdaLNModulation(width, 6, rngs=rngs, **kw)

    def __call__(
        self,
        x: jax.Array,
        condition: jax.Array,
        context: jax.Array | None,
        context_mask: jax.Array | None,
    ) -> jax.Array:
        """x: (B, T, D) image tokens; condition: (B, D) time (+ pooled text or class) embedding;
        context: (B, L, D) text token states or None; context_mask: (B, L) or None."""
        x = sharding.with_logical_constraint(x, layers.TOKEN_AXES)
        modulation = self.modulation(condition)  # 6 x (B, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        h = modulate(self.norm1(x), shift_msa, scale_msa)  # (B, T, D)
        x = x + gate_msa[:, None] * self.attn(h)  # (B, T, D)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), context, key_mask=context_mask)
        h = modulate(self.norm2(x), shift_mlp, scale_mlp)  # (B, T, D)
        x = x + gate_mlp[:, None] * self.mlp(h)  # (B, T, D)
        return sharding.with_logical_constraint(x, layers.TOKEN_AXES)


class FinalLayer(nnx.Module):
    """adaLN (shift, scale) on a parameter-free LayerNorm, then Dense(D -> p*p*C_out), zero-init."""

    def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs):
        kw = dict(
            dtype=layers.resolve_dtype(config.dtype),
            param_dtype=layers.resolve_dtype(config.param_dtype),
        )
        self.norm = layers.LayerNorm(config.width, eps=config.norm_eps, affine=False, **kw)
        self.modulation = AdaLNModulation(config.width, 2, rngs=rngs, **kw)
        self.linear = layers.Dense(
            config.width,
            config.patch_size * config.patch_size * config.out_channels,
            ("embed", "patch"),
            kernel_init=layers.zeros,
            rngs=rngs,
            **kw,
        )

    def __call__(self, x: jax.Array, condition: jax.Array) -> jax.Array:
        """x: (B, T, D) tokens; condition: (B, D) -> (B, T, p*p*C_out)."""
        shift, scale = self.modulation(condition)  # 2 x (B, D)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, T, p*p*C_out)


# ============================================================================================
# DiT
# ============================================================================================


class DiT(nnx.Module):
    """Diffusion transformer: (x (B, H, W, C), t (B,), conditioning) -> (B, H, W, C_out)."""

    def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs):
        dtype, param_dtype = (
            layers.resolve_dtype(config.dtype),
            layers.resolve_dtype(config.param_dtype),
        )
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = config
        self.dtype = dtype
        stem = patches.ConvStem if config.input_stem == "conv" else patches.PatchEmbed
        self.patch_embed = stem(config.patch_size, config.in_channels, config.width, **kw)
        self.time_embed = TimestepEmbedder(config, **kw)
        label_embed = context_embed = pooled_embed = words_embed = words_pooled_embed = None
        if config.conditioning == "class":
            # Row num_classes is the null class for classifier-free guidance (DiT LabelEmbedder).
            label_embed = embeddings.Embed(
                config.num_classes + 1,
                config.width,
                row_axis="classes",
                stddev=config.condition_init_std,
                param_dtype=param_dtype,
                rngs=rngs,
            )
        elif config.conditioning == "text":
            context_embed = ConditionProjection(
                config.context_dim, config.width, config.condition_init_std, **kw
            )
            # With words, adaLN's condition adds two projections: each starts at std / sqrt(2).
            pooled_std = config.condition_init_std / (2**0.5 if config.word_conditioning else 1.0)
            pooled_embed = ConditionProjection(config.pooled_dim, config.width, pooled_std, **kw)
            if config.word_conditioning:
                words_embed = ConditionProjection(
                    config.context_dim, config.width, config.condition_init_std, **kw
                )
                words_pooled_embed = ConditionProjection(
                    config.context_dim, config.width, pooled_std, **kw
                )
        self.label_embed, self.context_embed, self.pooled_embed = (
            nnx.data(label_embed),
            nnx.data(context_embed),
            nnx.data(pooled_embed),
        )
        self.words_embed = nnx.data(words_embed)
        self.words_pooled_embed = nnx.data(words_pooled_embed)
        self.blocks = blocks.BlockStack(
            lambda r: DiTBlock(config, rngs=r),
            config.depth,
            scan_layers=config.scan_layers,
            remat_policy=config.remat_policy,
            rngs=rngs,
        )
        self.final_layer = FinalLayer(config, rngs=rngs)
        self.output_conv = nnx.data(
            patches.PixelConv(config.out_channels, **kw) if config.output_conv else None
        )

    def _conditioning(self, batch, context, context_mask, pooled, words, labels):
        """Validate the conditioning inputs of the configured mode; embed them."""
        config = self.config
        given = {"context": context, "pooled": pooled, "words": words, "labels": labels}
        text = ("context", "pooled", "words") if config.word_conditioning else ("context", "pooled")
        needed = {"text": text, "class": ("labels",), "none": ()}[config.conditioning]
        missing = [name for name in needed if given[name] is None]
        unexpected = [name for name, v in given.items() if v is not None and name not in needed]
        if missing or unexpected:
            raise ValueError(
                f"conditioning={config.conditioning!r} needs {list(needed)}; "
                f"missing {missing}, unexpected {unexpected}"
            )
        if config.conditioning == "class":
            return self.label_embed(labels).astype(self.dtype), None, None  # (B, D)
        if config.conditioning == "none":
            return None, None, None
        if (
            context.ndim != 3
            or context.shape[-1] != config.context_dim
            or context.shape[0] != batch
        ):
            raise ValueError(
                f"context must be (batch={batch}, length, context_dim={config.context_dim}), "
                f"got {context.shape}"
            )
        if pooled.shape != (batch, config.pooled_dim):
            raise ValueError(
                f"pooled must be (batch={batch}, pooled_dim={config.pooled_dim}), "
                f"got {pooled.shape}"
            )
        if context_mask is None:
            context_mask = jnp.ones(context.shape[:2], bool)
        if context_mask.shape != context.shape[:2]:
            raise ValueError(
                f"context_mask {context_mask.shape} must match context {context.shape[:2]}"
            )
        extra, context_tokens = self.pooled_embed(pooled), self.context_embed(context)
        if config.word_conditioning:
            if words.shape != context.shape:
                raise ValueError(f"words {words.shape} must match context {context.shape}")
            weights = context_mask.astype(jnp.float32)[..., None]  # (B, L, 1)
            mean_words = (words * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)  # (B, Dc)
            extra = extra + self.words_pooled_embed(mean_words)
            context_tokens = jnp.concatenate([context_tokens, self.words_embed(words)], axis=1)
            context_mask = jnp.concatenate([context_mask, context_mask], axis=1)  # (B, 2L)
        return extra, context_tokens, context_mask

    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        context: jax.Array | None = None,
        context_mask: jax.Array | None = None,
        pooled: jax.Array | None = None,
        labels: jax.Array | None = None,
        words: jax.Array | None = None,
    ) -> jax.Array:
        config = self.config
        b, h, w, ch = x.shape
        if ch != config.in_channels:
            raise ValueError(f"x has {ch} channels, the model expects {config.in_channels}")
        if t.shape != (b,):
            raise ValueError(f"t must have shape (batch,) = ({b},), got {t.shape}")
        p = config.patch_size
        positions = embeddings.sincos_2d(config.width, h // p, w // p)  # (T, D) constant
        tokens = self.patch_embed(x.astype(self.dtype))  # (B, T, D); checks divisibility by p
        tokens = tokens + jnp.asarray(positions, self.dtype)[None]  # (B, T, D)
        condition = self.time_embed(t)  # (B, D)
        extra, context_tokens, context_mask = self._conditioning(
            b, context, context_mask, pooled, words, labels
        )
        if extra is not None:
            condition = condition + extra  # (B, D)
        tokens = self.blocks(tokens, condition, context_tokens, context_mask)  # (B, T, D)
        out = self.final_layer(tokens, condition)  # (B, T, p*p*C_out)
        images = patches.unpatchify(out, p, h, w)  # (B, H, W, C_out)
        if self.output_conv is not None:
            images = self.output_conv(images)
        return images.astype(jnp.float32)
