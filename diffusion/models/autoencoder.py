"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models", sec. 3 and appendix G), laid out as diffusers'
`AutoencoderKL` so that its checkpoints import tensor by tensor (`diffusion.hf.autoencoder`).

Images are NHWC in [-1, 1]; latents are NHWC with `latent_channels` channels and a side
2^(len(block_out_channels) - 1) times smaller. `encode` returns the mean and log-variance of the
diagonal Gaussian posterior q(z | x); `decode` maps latents back to images. A diffusion model
sees `scale_latents(z)` = (z - shift_factor) * scaling_factor, about unit variance (Rombach et
al. sec. 4.3.2; Flux also subtracts a shift); `unscale_latents` undoes it before `decode`.

Architecture (the VQGAN/LDM convolutional autoencoder, Esser et al. 2021):
  encoder: conv_in -> per level: ResnetBlocks, then (except the last level) a stride-2 conv
           -> mid (ResnetBlock, single-head attention over the H*W positions, ResnetBlock)
           -> GroupNorm, SiLU, conv_out to 2 * latent_channels -> [1x1 quant_conv]
  decoder: [1x1 post_quant_conv] -> conv_in -> mid -> per level (widest first):
           layers_per_block + 1 ResnetBlocks, then (except the last) nearest 2x upsample + conv
           -> GroupNorm, SiLU, conv_out
Every GroupNorm has eps 1e-6 and float32 statistics. Parameters are stored in `param_dtype` and
cast to the compute `dtype`; initialisers are PyTorch's defaults for convolutions (uniform with
bound 1/sqrt(fan_in)) with zero biases, so a model trained from scratch starts like diffusers'.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion.models import attention, layers

# PyTorch's default Conv2d / Linear weight init (kaiming_uniform with a = sqrt(5)):
# uniform in +-1/sqrt(fan_in), fan_in = kernel height * width * input channels.
torch_default = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
CONV_AXES = ("height", "width", "conv_in", "channels")
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps log-variances


# ============================================================================================
# Config and variants
# ============================================================================================


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """Every size and numeric choice of a KL autoencoder (the fields of diffusers' config.json)."""

    in_channels: int = 3  # image channels
    out_channels: int = 3  # channels of decoded images
    latent_channels: int = 4  # 4 in Stable Diffusion 1/2/XL, 16 in SD3 and Flux
    block_out_channels: tuple[int, ...] = (32, 64)  # width of each level; n levels: 2^(n-1)x
    layers_per_block: int = 1  # ResnetBlocks per encoder level (the decoder has one more)
    norm_num_groups: int = 8  # GroupNorm groups; must divide every width
    sample_size: int = 32  # image side trained on; `tiled_decode` tiles at this size
    scaling_factor: float = 1.0  # latent scale for diffusion (SD: 0.18215, Flux: 0.3611)
    shift_factor: float | None = None  # latent shift subtracted before scaling (Flux: 0.1159)
    use_quant_conv: bool = True  # 1x1 conv on the encoder's moments (absent in SD3 / Flux)
    use_post_quant_conv: bool = True  # 1x1 conv on the latents before decoding
    mid_block_add_attention: bool = True  # single-head attention in the middle blocks
    # Execution.
    dtype: str = "float32"  # compute dtype; GroupNorm statistics and softmax stay float32
    param_dtype: str = "float32"  # parameter storage dtype
    attention_impl: str = "xla"  # 'xla' einsum softmax or 'fused' jax.nn.dot_product_attention

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        if not self.block_out_channels:
            raise ValueError("block_out_channels is empty; give one width per level, e.g. (32, 64)")
        for width in self.block_out_channels:
            if width % self.norm_num_groups:
                raise ValueError(
                    f"block_out_channels {self.block_out_channels}: width {width} is not "
                    f"divisible by norm_num_groups {self.norm_num_groups}"
                )
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be positive, got {self.scaling_factor}")
        layers.resolve_dtype(self.dtype)
        layers.resolve_dtype(self.param_dtype)
        if self.attention_impl not in attention.ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"unknown attention_impl {self.attention_impl!r}; "
                f"valid: {attention.ATTENTION_IMPLEMENTATIONS}"
            )

    @property
    def downsampling_factor(self) -> int:
        """Image side / latent side."""
        return 2 ** (len(self.block_out_channels) - 1)


_LARGE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
AUTOENCODER_VARIANTS = {
    "tiny": {},
    # stabilityai/sd-vae-ft-mse and the VAE of Stable Diffusion 1.x / 2.x
    "SD": dict(_LARGE, latent_channels=4, sample_size=512, scaling_factor=0.18215),
    # black-forest-labs/FLUX.1-dev: 16 latent channels, no quant convs, shifted latents
    "Flux": dict(
        _LARGE, latent_channels=16, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    ),
}  # fmt: skip


def autoencoder_config(variant: str = "tiny", **overrides) -> AutoencoderConfig:
    """The AutoencoderConfig of an AUTOENCODER_VARIANTS entry, with field overrides."""
    if variant not in AUTOENCODER_VARIANTS:
        raise ValueError(
            f"unknown autoencoder variant {variant!r}; valid: {sorted(AUTOENCODER_VARIANTS)}"
        )
    fields = {f.name for f in dataclasses.fields(AutoencoderConfig)}
    if set(overrides) - fields:
        raise ValueError(
            f"unknown AutoencoderConfig field(s) {sorted(set(overrides) - fields)}; "
            f"valid: {sorted(fields)}"
        )
    return AutoencoderConfig(**{**AUTOENCODER_VARIANTS[variant], **overrides})


# ============================================================================================
# Layers: GroupNorm, Conv2d, ResnetBlock, mid-block attention
# ============================================================================================


class GroupNorm(nnx.Module):
    """GroupNorm (Wu & He 2018) over (H, W, C / groups) of NHWC inputs, float32 statistics."""

    def __init__(self, channels, groups, *, eps=1e-6, dtype, param_dtype, rngs):
        self.groups, self.eps, self.dtype = groups, eps, dtype
        self.scale = layers.make_param(rngs, layers.ones, (channels,), ("norm",), param_dtype)
        self.bias = layers.make_param(rngs, layers.zeros, (channels,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        grouped = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
        mean = jnp.mean(grouped, axis=(1, 2, 4), keepdims=True)  # (B, 1, 1, G, 1)
        variance = jnp.mean(jnp.square(grouped - mean), axis=(1, 2, 4), keepdims=True)
        y = ((grouped - mean) * jax.lax.rsqrt(variance + self.eps)).reshape(b, h, w, c)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class Conv2d(nnx.Module):
    """A k x k convolution of NHWC inputs with an HWIO kernel and a bias.

    `padding` defaults to PyTorch's padding = k // 2 on every side ('SAME' for odd k, stride 1);
    diffusers' encoder downsampler uses stride 2 with ((0, 1), (0, 1)): zeros added only below
    and to the right, so a 2H x 2W input gives exactly H x W.
    """

    def __init__(self, in_channels, out_channels, kernel_size=3, *, stride=1, padding=None,
                 dtype, param_dtype, rngs):  # fmt: skip
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        self.kernel = layers.make_param(rngs, torch_default, shape, CONV_AXES, param_dtype)
        self.bias = layers.make_param(rngs, layers.zeros, (out_channels,), ("channels",),
                                      param_dtype)  # fmt: skip
        self.stride = stride
        self.padding = padding or ((kernel_size // 2,) * 2,) * 2
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            window_strides=(self.stride, self.stride),
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )  # (B, H / stride, W / stride, out_channels)
        return y + self.bias[...].astype(self.dtype)


class ResnetBlock(nnx.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))) (He et al. 2016, pre-activation form); a 1x1
    convolution maps x to the new width when the block changes the number of channels."""

    def __init__(self, in_channels, out_channels, groups, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = GroupNorm(in_channels, groups, **kw)
        self.conv1 = Conv2d(in_channels, out_channels, **kw)
        self.norm2 = GroupNorm(out_channels, groups, **kw)
        self.conv2 = Conv2d(out_channels, out_channels, **kw)
        self.shortcut = nnx.data(
            Conv2d(in_channels, out_channels, 1, **kw) if in_channels != out_channels else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))  # (B, H, W, out)
        h = self.conv2(jax.nn.silu(self.norm2(h)))  # (B, H, W, out)
        if self.shortcut is not None:
            x = self.shortcut(x)  # (B, H, W, out)
        return x.astype(h.dtype) + h


class MidAttention(nnx.Module):
    """x + out(softmax(q k^T / sqrt(C)) v) with q, k, v linear maps of GroupNorm(x): one head
    over the H * W positions (Vaswani et al. 2017, eq. 1), the softmax in float32."""

    def __init__(self, channels, groups, *, implementation, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = GroupNorm(channels, groups, **kw)
        dense = lambda: layers.Dense(channels, channels, ("conv_in", "channels"),
                                     kernel_init=torch_default, **kw)  # fmt: skip
        self.query, self.key, self.value, self.out = dense(), dense(), dense(), dense()
        self.implementation = implementation

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = self.norm(x).reshape(b, h * w, 1, c)  # (B, T, 1 head, C), T = H * W
        q, k, v = self.query(tokens), self.key(tokens), self.value(tokens)
        y = attention.dot_product_attention(q, k, v, None, self.implementation)  # (B, T, 1, C)
        y = self.out(y.reshape(b, h * w, c)).reshape(b, h, w, c)  # (B, H, W, C)
        return x.astype(y.dtype) + y


class MidBlock(nnx.Module):
    """ResnetBlock, attention (when enabled), ResnetBlock at the lowest resolution."""

    def __init__(self, channels, config: AutoencoderConfig, **kw):
        groups = config.norm_num_groups
        self.resnets = nnx.List([ResnetBlock(channels, channels, groups, **kw) for _ in range(2)])
        self.attention = nnx.data(
            MidAttention(channels, groups, implementation=config.attention_impl, **kw)
            if config.mid_block_add_attention
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x)  # (B, H, W, C)


class Level(nnx.Module):
    """ResnetBlocks at one resolution, then a resampling convolution (None at the last level):
    stride 2 in the encoder, nearest-neighbour 2x upsampling before it in the decoder."""

    def __init__(self, in_channels, out_channels, num_resnets, resample, groups, **kw):
        self.resnets = nnx.List(
            [
                ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, **kw)
                for i in range(num_resnets)
            ]
        )
        self.resample = resample
        down = dict(stride=2, padding=((0, 1), (0, 1)))  # diffusers' Downsample2D(padding=0)
        self.conv = nnx.data(
            Conv2d(out_channels, out_channels, **(down if resample == "down" else {}), **kw)
            if resample
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)  # (B, H, W, out)
        if self.resample == "up":
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # (B, 2H, 2W, out), nearest
        if self.conv is not None:
            x = self.conv(x)  # (B, H / 2, W / 2, out) down, (B, 2H, 2W, out) up
        return x


# ============================================================================================
# Encoder, decoder, autoencoder
# ============================================================================================


class Encoder(nnx.Module):
    """Images (B, H, W, in_channels) -> posterior moments (B, H / f, W / f, 2 * latent)."""

    def __init__(self, config: AutoencoderConfig, **kw):
        widths, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = Conv2d(config.in_channels, widths[0], **kw)
        self.levels = nnx.List(
            [
                Level(widths[max(i - 1, 0)], width, config.layers_per_block,
                      "down" if i < len(widths) - 1 else None, groups, **kw)
                for i, width in enumerate(widths)
            ]
        )  # fmt: skip
        self.mid = MidBlock(widths[-1], config, **kw)
        self.norm_out = GroupNorm(widths[-1], groups, **kw)
        self.conv_out = Conv2d(widths[-1], 2 * config.latent_channels, **kw)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = self.conv_in(images)  # (B, H, W, widths[0])
        for level in self.levels:
            x = level(x)  # (B, H / 2^(n-1), W / 2^(n-1), widths[-1]) after the last
        x = self.mid(x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))  # (B, h, w, 2 * latent_channels)


class Decoder(nnx.Module):
    """Latents (B, h, w, latent_channels) -> images (B, h * f, w * f, out_channels)."""

    def __init__(self, config: AutoencoderConfig, **kw):
        widths, groups = config.block_out_channels[::-1], config.norm_num_groups
        self.conv_in = Conv2d(config.latent_channels, widths[0], **kw)
        self.mid = MidBlock(widths[0], config, **kw)
        self.levels = nnx.List(
            [
                Level(widths[max(i - 1, 0)], width, config.layers_per_block + 1,
                      "up" if i < len(widths) - 1 else None, groups, **kw)
                for i, width in enumerate(widths)
            ]
        )  # fmt: skip
        self.norm_out = GroupNorm(widths[-1], groups, **kw)
        self.conv_out = Conv2d(widths[-1], config.out_channels, **kw)

    def __call__(self, latents: jax.Array) -> jax.Array:
        x = self.mid(self.conv_in(latents))  # (B, h, w, widest)
        for level in self.levels:
            x = level(x)  # (B, H, W, block_out_channels[0]) after the last
        return self.conv_out(jax.nn.silu(self.norm_out(x)))  # (B, H, W, out_channels)


class Autoencoder(nnx.Module):
    """Images (B, H, W, in_channels) in [-1, 1] <-> latents (B, H / f, W / f, latent_channels),
    f = config.downsampling_factor."""

    def __init__(self, config: AutoencoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        latent = config.latent_channels
        kw = dict(
            dtype=layers.resolve_dtype(config.dtype),
            param_dtype=layers.resolve_dtype(config.param_dtype),
            rngs=rngs,
        )
        self.encoder = Encoder(config, **kw)
        self.decoder = Decoder(config, **kw)
        self.quant_conv = nnx.data(
            Conv2d(2 * latent, 2 * latent, 1, **kw) if config.use_quant_conv else None
        )
        self.post_quant_conv = nnx.data(
            Conv2d(latent, latent, 1, **kw) if config.use_post_quant_conv else None
        )

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(mean, logvar) of the posterior q(z | images), each (B, H / f, W / f, latent), in
        float32; logvar clipped to [-30, 20] as diffusers does."""
        _check_channels(images, self.config.in_channels, "images", "in_channels")
        moments = self.encoder(images)  # (B, h, w, 2 * latent)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)  # (B, h, w, latent)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Images (B, h * f, w * f, out_channels), about [-1, 1], from unscaled latents."""
        _check_channels(latents, self.config.latent_channels, "latents", "latent_channels")
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    def tiled_decode(
        self, latents: jax.Array, tile: int | None = None, overlap: int | None = None
    ) -> jax.Array:
        """`decode` of latents larger than the training size, tile by tile (diffusers'
        `AutoencoderKL.tiled_decode`), so memory stays that of one tile.

        Tiles of `tile` x `tile` latents (default sample_size / f) start every `tile - overlap`
        latents (default overlap: tile // 4) along each axis; the last ones may be smaller. Each
        is decoded on its own; then, in row-major order, a tile's first overlap * f rows are
        mixed linearly with the last ones of the (already blended) tile above, weight y / (overlap
        * f) on its own row y, and the same for columns with the tile to the left. Each tile
        keeps its first (tile - overlap) * f rows and columns. diffusers' `enable_tiling()` with
        tile_latent_min_size = tile and tile_overlap_factor = overlap / tile gives the same
        numbers. Seams are softened, not removed: the tiles never see each other's context.
        """
        f = self.config.downsampling_factor
        tile = tile or max(self.config.sample_size // f, 1)
        overlap = tile // 4 if overlap is None else overlap
        if not 0 <= overlap < tile:
            raise ValueError(f"tiled_decode: overlap {overlap} must be in [0, tile={tile})")
        stride, blend, keep = tile - overlap, overlap * f, (tile - overlap) * f
        _, h, w, _ = latents.shape
        tiles = [
            [self.decode(latents[:, i : i + tile, j : j + tile]) for j in range(0, w, stride)]
            for i in range(0, h, stride)
        ]  # tiles[i][j]: (B, <= tile * f, <= tile * f, out_channels)
        rows = []
        for i, row in enumerate(tiles):
            for j in range(len(row)):
                if i > 0:
                    row[j] = _blend(tiles[i - 1][j], row[j], blend, axis=1)
                if j > 0:
                    row[j] = _blend(row[j - 1], row[j], blend, axis=2)
            rows.append(jnp.concatenate([t[:, :keep, :keep] for t in row], axis=2))
        return jnp.concatenate(rows, axis=1)  # (B, h * f, w * f, out_channels)

    def scale_latents(self, latents: jax.Array) -> jax.Array:
        """(z - shift_factor) * scaling_factor: the latents a diffusion model sees."""
        shift = self.config.shift_factor or 0.0
        return (latents - shift) * self.config.scaling_factor

    def unscale_latents(self, latents: jax.Array) -> jax.Array:
        """Inverse of `scale_latents`: z / scaling_factor + shift_factor, ready for `decode`."""
        shift = self.config.shift_factor or 0.0
        return latents / self.config.scaling_factor + shift

    def __call__(self, images: jax.Array) -> jax.Array:
        """Reconstruction through the posterior mean (no sampling)."""
        mean, _ = self.encode(images)
        return self.decode(mean)


def _blend(before: jax.Array, tile: jax.Array, extent: int, axis: int) -> jax.Array:
    """`tile` with its first `extent` rows (axis 1) or columns (axis 2) mixed linearly with the
    last ones of `before`: weight n / extent on the tile's own n-th row."""
    extent = min(before.shape[axis], tile.shape[axis], extent)
    if extent == 0:
        return tile
    shape = [1, 1, 1, 1]
    shape[axis] = extent
    weight = (jnp.arange(extent, dtype=jnp.float32) / extent).reshape(shape)
    size = before.shape[axis]
    head = jax.lax.slice_in_dim(before, size - extent, size, axis=axis) * (1 - weight)
    head = head + jax.lax.slice_in_dim(tile, 0, extent, axis=axis) * weight
    rest = jax.lax.slice_in_dim(tile, extent, tile.shape[axis], axis=axis)
    return jnp.concatenate([head.astype(tile.dtype), rest], axis=axis)


def _check_channels(x: jax.Array, channels: int, what: str, field: str) -> None:
    if x.ndim != 4 or x.shape[-1] != channels:
        raise ValueError(
            f"{what} of shape {tuple(x.shape)} are not NHWC with {channels} channels "
            f"(config.{field}); pass (batch, height, width, {channels})"
        )
