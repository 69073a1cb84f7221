"""Wan 2.1's causal 3-D video autoencoder (Wan team 2025, "Wan: Open and Advanced Large-Scale
Video Generative Models", sec. 3.1), laid out as diffusers' `AutoencoderKLWan` so that its
checkpoints import tensor by tensor (`diffusion.hf.wan_vae`).

Clips are (B, T, H, W, C) in [-1, 1] with T = 1 + 4k frames; latents are (B, 1 + k * 4 / f_t,
H / f_s, W / f_s, z_dim): the first frame is encoded on its own (so an image is a one-frame clip)
and every later group of f_t frames becomes one latent frame. `encode` returns the mean and
log-variance of the diagonal Gaussian posterior; a diffusion model sees `normalize_latents(z)` =
(z - latents_mean) / latents_std per channel, and `denormalize_latents` undoes it before `decode`.

Causality: every 3-D convolution looks only at the current and the two previous frames (zeros
before the first). That makes encoding and decoding chunk by chunk exact: the encoder takes the
first frame, then chunks of 4 frames; the decoder one latent frame at a time. Each temporal
convolution keeps the last frames of its input as a cache that the next chunk continues from, so
a long clip never holds all frames' activations at once. The caches are explicit state: every
layer maps (x, cache) -> (y, new cache), and cache None means "first chunk of the clip".

Architecture (diffusers' WanEncoder3d / WanDecoder3d with is_residual False, as in Wan 2.1):
  encoder: causal conv_in -> per level: num_res_blocks ResidualBlocks, then (except the last
           level) a stride-2 spatial conv, followed by a stride-2 temporal conv where
           temporal_downsample says so -> mid (ResidualBlock, per-frame attention, ResidualBlock)
           -> RMS norm, SiLU, causal conv_out to 2 * z_dim -> 1x1x1 quant_conv
  decoder: 1x1x1 post_quant_conv -> causal conv_in -> mid -> per level (widest first):
           num_res_blocks + 1 ResidualBlocks, then (except the last) a temporal conv doubling the
           frames where the mirrored temporal_downsample says so, nearest 2x upsampling and a
           conv halving the width -> RMS norm, SiLU, causal conv_out -> clamp to [-1, 1]
Norms are Wan's RMS norm over channels (x / ||x|| * sqrt(C) * gamma, no mean, eps only against
division by zero), statistics in float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion.models import attention, layers
from diffusion.models.autoencoder import LOGVAR_RANGE, Conv2d, torch_default

CACHE_FRAMES = 2  # a 3-tap causal convolution needs the two frames before a chunk
FIRST_CHUNK_FRAMES = 1  # Wan encodes the first frame alone, so images and clips share latents
CHUNK_FRAMES = 4  # ... then 4 frames at a time (diffusers' AutoencoderKLWan._encode)
CONV3D_AXES = ("frames", "height", "width", "conv_in", "channels")
NORM_EPS = 1e-12  # torch.nn.functional.normalize's floor on the norm

# Wan 2.1's per-channel latent statistics (the config.json of Wan-AI/Wan2.1-T2V-*-Diffusers).
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


# ============================================================================================
# Config and variants
# ============================================================================================


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
    """Every size and numeric choice of a Wan 2.1 autoencoder (diffusers' config.json fields)."""

    base_dim: int = 16  # encoder width of the first level (Wan 2.1: 96)
    decoder_base_dim: int | None = None  # decoder base width; None: base_dim
    z_dim: int = 4  # latent channels (Wan 2.1: 16)
    dim_mult: tuple[int, ...] = (1, 2, 4)  # width multiplier per level; n levels: 2^(n-1) x
    num_res_blocks: int = 1  # ResidualBlocks per encoder level (the decoder has one more)
    temporal_downsample: tuple[bool, ...] = (False, True)  # per resampling level, encoder order
    in_channels: int = 3  # clip channels
    out_channels: int = 3  # decoded clip channels
    latents_mean: tuple[float, ...] | None = None  # per-channel latent mean; None: zeros
    latents_std: tuple[float, ...] | None = None  # per-channel latent std; None: ones
    # Execution.
    dtype: str = "float32"  # compute dtype; norm statistics and softmax stay float32
    param_dtype: str = "float32"  # parameter storage dtype
    attention_impl: str = "xla"  # 'xla' einsum softmax or 'fused' jax.nn.dot_product_attention

    def __post_init__(self):
        for name in ("dim_mult", "temporal_downsample"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.dim_mult:
            raise ValueError("dim_mult is empty; give one width multiplier per level, e.g. (1, 2)")
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample {self.temporal_downsample} needs one entry per resampling "
                f"level: {len(self.dim_mult) - 1} for dim_mult {self.dim_mult}"
            )
        if sum(self.temporal_downsample) > 2:
            raise ValueError(
                f"temporal_downsample {self.temporal_downsample} halves time "
                f"{sum(self.temporal_downsample)} times; a chunk of {CHUNK_FRAMES} frames allows "
                "at most 2"
            )
        for name in ("base_dim", "z_dim", "num_res_blocks", "in_channels", "out_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.decoder_base_dim is not None and self.decoder_base_dim < 1:
            raise ValueError(f"decoder_base_dim must be at least 1, got {self.decoder_base_dim}")
        for name, default in (("latents_mean", 0.0), ("latents_std", 1.0)):
            values = getattr(self, name)
            values = (default,) * self.z_dim if values is None else tuple(map(float, values))
            if len(values) != self.z_dim:
                raise ValueError(f"{name} has {len(values)} entries; z_dim is {self.z_dim}")
            object.__setattr__(self, name, values)
        if min(self.latents_std) <= 0:
            raise ValueError(f"latents_std must be positive, got {self.latents_std}")
        layers.resolve_dtype(self.dtype)
        layers.resolve_dtype(self.param_dtype)
        if self.attention_impl not in attention.ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"unknown attention_impl {self.attention_impl!r}; "
                f"valid: {attention.ATTENTION_IMPLEMENTATIONS}"
            )

    @property
    def spatial_factor(self) -> int:
        """Clip side / latent side."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        """Frames after the first per latent frame."""
        return 2 ** sum(self.temporal_downsample)

    def latent_frames(self, frames: int) -> int:
        """Latent frames of a clip of `frames` = 1 + 4k frames."""
        return 1 + (frames - 1) // self.temporal_factor


WAN_VAE_VARIANTS = {
    "tiny": {},
    # Wan-AI/Wan2.1-T2V-1.3B-Diffusers and -14B-Diffusers share this autoencoder (vae/).
    "Wan2.1": dict(
        base_dim=96, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
        temporal_downsample=(False, True, True),
        latents_mean=WAN21_LATENTS_MEAN, latents_std=WAN21_LATENTS_STD,
    ),
}  # fmt: skip


def wan_vae_config(variant: str = "tiny", **overrides) -> WanVAEConfig:
    """The WanVAEConfig of a WAN_VAE_VARIANTS entry, with field overrides."""
    if variant not in WAN_VAE_VARIANTS:
        raise ValueError(f"unknown Wan VAE variant {variant!r}; valid: {sorted(WAN_VAE_VARIANTS)}")
    fields = {f.name for f in dataclasses.fields(WanVAEConfig)}
    if set(overrides) - fields:
        raise ValueError(
            f"unknown WanVAEConfig field(s) {sorted(set(overrides) - fields)}; "
            f"valid: {sorted(fields)}"
        )
    return WanVAEConfig(**{**WAN_VAE_VARIANTS[variant], **overrides})


# ============================================================================================
# Layers: RMS norm, causal 3-D convolution, residual block, per-frame attention
# ============================================================================================


class RMSNorm(nnx.Module):
    """Wan's norm over the channels of each position: x / max(||x||, 1e-12) * sqrt(C) * gamma
    (torch's F.normalize scaled back to unit RMS); float32 statistics."""

    def __init__(self, channels, *, dtype, param_dtype, rngs):
        self.scale = layers.make_param(rngs, layers.ones, (channels,), ("norm",), param_dtype)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))  # (..., 1)
        y = x32 / jnp.maximum(norm, NORM_EPS) * (x.shape[-1] ** 0.5)
        return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class Conv3d(nnx.Module):
    """A (kt, kh, kw) convolution of (B, T, H, W, C) inputs with a THWIO kernel and a bias; time
    is never padded (the caller prepends past frames), space by kh // 2 and kw // 2."""

    def __init__(self, in_channels, out_channels, kernel_size=(3, 3, 3), *, time_stride=1,
                 dtype, param_dtype, rngs):  # fmt: skip
        shape = (*kernel_size, in_channels, out_channels)
        self.kernel = layers.make_param(rngs, torch_default, shape, CONV3D_AXES, param_dtype)
        self.bias = layers.make_param(rngs, layers.zeros, (out_channels,), ("channels",),
                                      param_dtype)  # fmt: skip
        _, kh, kw = kernel_size
        self.padding = ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2))
        self.time_stride = time_stride
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            window_strides=(self.time_stride, 1, 1),
            padding=self.padding,
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        )  # (B, (T - kt) / stride + 1, H, W, out_channels)
        return y + self.bias[...].astype(self.dtype)


class CausalConv3d(nnx.Module):
    """A 3-tap-in-time convolution that sees only the present and the past: the chunk is
    preceded by the last CACHE_FRAMES input frames of the previous chunk (zeros at the start of
    the clip), so chunk by chunk equals the whole clip at once."""

    def __init__(self, in_channels, out_channels, kernel_size=(3, 3, 3), **kw):
        self.conv = Conv3d(in_channels, out_channels, kernel_size, **kw)

    def __call__(self, x: jax.Array, cache: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        b, _, h, w, c = x.shape
        if cache is None:
            cache = jnp.zeros((b, CACHE_FRAMES, h, w, c), x.dtype)
        window = jnp.concatenate([cache.astype(x.dtype), x], axis=1)  # (B, 2 + T, H, W, C)
        return self.conv(window), window[:, -CACHE_FRAMES:]  # (B, T, H, W, out), cache


def pointwise(in_channels, out_channels, **kw) -> layers.Dense:
    """A 1x1(x1) convolution: a Dense over channels, PyTorch's default init."""
    return layers.Dense(in_channels, out_channels, ("conv_in", "channels"),
                        kernel_init=torch_default, **kw)  # fmt: skip


def _parts(cache, count: int) -> tuple:
    """The sub-caches of a module's cache: `count` Nones for the first chunk of a clip."""
    return (None,) * count if cache is None else cache


def _chain(modules, x: jax.Array, cache) -> tuple[jax.Array, tuple]:
    """`modules` applied in turn, each with its own part of `cache`; (output, their caches)."""
    new_caches = []
    for module, part in zip(modules, _parts(cache, len(modules)), strict=True):
        x, part = module(x, part)
        new_caches.append(part)
    return x, tuple(new_caches)


class ResidualBlock(nnx.Module):
    """shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x)))))) with causal 3-D convolutions; the
    shortcut is a 1x1x1 convolution when the width changes, else the identity."""

    def __init__(self, in_channels, out_channels, **kw):
        self.norm1 = RMSNorm(in_channels, **kw)
        self.conv1 = CausalConv3d(in_channels, out_channels, **kw)
        self.norm2 = RMSNorm(out_channels, **kw)
        self.conv2 = CausalConv3d(out_channels, out_channels, **kw)
        self.shortcut = nnx.data(
            pointwise(in_channels, out_channels, **kw) if in_channels != out_channels else None
        )

    def __call__(self, x: jax.Array, cache) -> tuple[jax.Array, tuple]:
        cache1, cache2 = _parts(cache, 2)
        h, cache1 = self.conv1(jax.nn.silu(self.norm1(x)), cache1)  # (B, T, H, W, out)
        h, cache2 = self.conv2(jax.nn.silu(self.norm2(h)), cache2)  # (B, T, H, W, out)
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        return shortcut.astype(h.dtype) + h, (cache1, cache2)


class FrameAttention(nnx.Module):
    """x + out(softmax(q k^T / sqrt(C)) v) over the H * W positions of each frame separately (one
    head; q, k, v from one 1x1 convolution of the RMS-normed x), the softmax in float32."""

    def __init__(self, channels, *, implementation, **kw):
        self.norm = RMSNorm(channels, **kw)
        self.qkv = pointwise(channels, 3 * channels, **kw)
        self.out = pointwise(channels, channels, **kw)
        self.implementation = implementation

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, h, w, c = x.shape
        tokens = self.norm(x).reshape(b * t, h * w, 1, c)  # (B * T, H * W, 1 head, C)
        q, k, v = jnp.split(self.qkv(tokens), 3, axis=-1)  # each (B * T, H * W, 1, C)
        y = attention.dot_product_attention(q, k, v, None, self.implementation)
        y = self.out(y.reshape(b, t, h, w, c))  # (B, T, H, W, C)
        return x.astype(y.dtype) + y


class MidBlock(nnx.Module):
    """ResidualBlock, per-frame attention, ResidualBlock at the lowest resolution."""

    def __init__(self, channels, *, implementation, **kw):
        self.resnets = nnx.List([ResidualBlock(channels, channels, **kw) for _ in range(2)])
        self.attention = FrameAttention(channels, implementation=implementation, **kw)

    def __call__(self, x: jax.Array, cache) -> tuple[jax.Array, tuple]:
        first, second = _parts(cache, 2)
        x, first = self.resnets[0](x, first)
        x, second = self.resnets[1](self.attention(x), second)
        return x, (first, second)  # (B, T, H, W, C)


def _per_frame(layer, x: jax.Array) -> jax.Array:
    """A 2-D layer applied to every frame: (B, T, H, W, C) -> (B, T, H', W', C')."""
    b, t = x.shape[:2]
    y = layer(x.reshape(b * t, *x.shape[2:]))  # (B * T, H', W', C')
    return y.reshape(b, t, *y.shape[1:])


# ============================================================================================
# Resampling
# ============================================================================================


class Downsample(nnx.Module):
    """Halves H and W with a stride-2 3x3 convolution (zeros padded below and to the right), then,
    when `temporal`, time with a stride-2 3-tap convolution over (last frame of the previous
    chunk, this chunk). The first chunk's single frame passes through unchanged in time, so T
    frames become 1 + (T - 1) / 2."""

    def __init__(self, channels, temporal: bool, **kw):
        self.spatial = Conv2d(channels, channels, stride=2, padding=((0, 1), (0, 1)), **kw)
        self.temporal = nnx.data(
            Conv3d(channels, channels, (3, 1, 1), time_stride=2, **kw) if temporal else None
        )

    def __call__(self, x: jax.Array, cache: jax.Array | None):
        x = _per_frame(self.spatial, x)  # (B, T, H / 2, W / 2, C)
        if self.temporal is None:
            return x, None
        last = x[:, -1:]  # the next chunk's first window starts at this frame
        if cache is None:  # the clip's first frame passes through unchanged in time
            return x, last
        return self.temporal(jnp.concatenate([cache, x], axis=1)), last  # (B, T / 2, ...)


class Upsample(nnx.Module):
    """Doubles H and W (nearest neighbour, then a 3x3 convolution halving the width); first, when
    `temporal`, doubles time: a causal 3-tap convolution gives 2C channels per frame, read as two
    frames of C. The first chunk is not doubled (it decodes the clip's first frame alone) and
    leaves the cache at zeros, so the second chunk starts the temporal convolution afresh."""

    def __init__(self, channels, temporal: bool, **kw):
        self.temporal = nnx.data(
            CausalConv3d(channels, 2 * channels, (3, 1, 1), **kw) if temporal else None
        )
        self.spatial = Conv2d(channels, channels // 2, **kw)

    def __call__(self, x: jax.Array, cache: jax.Array | None):
        b, t, h, w, c = x.shape
        if self.temporal is not None and cache is None:
            cache = jnp.zeros((b, CACHE_FRAMES, h, w, c), x.dtype)
        elif self.temporal is not None:
            pairs, cache = self.temporal(x, cache)  # (B, T, H, W, 2C): [earlier | later] frame
            pairs = pairs.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5)  # (B, T, 2, ...)
            x = pairs.reshape(b, 2 * t, h, w, c)  # (B, 2T, H, W, C)
        x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # (B, T', 2H, 2W, C)
        return _per_frame(self.spatial, x), cache  # (B, T', 2H, 2W, C / 2)


class Level(nnx.Module):
    """ResidualBlocks at one resolution, then a Downsample or Upsample (None at the last level)."""

    def __init__(self, in_channels, out_channels, num_resnets, resample, **kw):
        self.resnets = nnx.List(
            [
                ResidualBlock(in_channels if i == 0 else out_channels, out_channels, **kw)
                for i in range(num_resnets)
            ]
        )
        self.resample = nnx.data(resample)

    def __call__(self, x: jax.Array, cache) -> tuple[jax.Array, tuple]:
        resnet_caches, resample_cache = _parts(cache, 2)
        x, resnet_caches = _chain(self.resnets, x, resnet_caches)  # (B, T, H, W, out)
        if self.resample is not None:
            x, resample_cache = self.resample(x, resample_cache)
        return x, (resnet_caches, resample_cache)


# ============================================================================================
# Encoder, decoder, autoencoder
# ============================================================================================


class Encoder(nnx.Module):
    """One chunk of clip (B, T, H, W, in_channels) and the cache of the chunks before ->
    posterior moments (B, T', H / f_s, W / f_s, 2 * z_dim) and the new cache."""

    def __init__(self, config: WanVAEConfig, **kw):
        widths = [config.base_dim * m for m in (1, *config.dim_mult)]
        self.conv_in = CausalConv3d(config.in_channels, widths[0], **kw)
        levels = []
        for i, temporal in enumerate((*config.temporal_downsample, None)):
            resample = None if temporal is None else Downsample(widths[i + 1], temporal, **kw)
            levels.append(Level(widths[i], widths[i + 1], config.num_res_blocks, resample, **kw))
        self.levels = nnx.List(levels)
        self.mid = MidBlock(widths[-1], implementation=config.attention_impl, **kw)
        self.norm_out = RMSNorm(widths[-1], **kw)
        self.conv_out = CausalConv3d(widths[-1], 2 * config.z_dim, **kw)

    def __call__(self, frames: jax.Array, cache) -> tuple[jax.Array, tuple]:
        conv_in_cache, level_caches, mid_cache, conv_out_cache = _parts(cache, 4)
        x, conv_in_cache = self.conv_in(frames, conv_in_cache)  # (B, T, H, W, widths[0])
        x, level_caches = _chain(self.levels, x, level_caches)  # (B, T', h, w, widths[-1])
        x, mid_cache = self.mid(x, mid_cache)
        moments, conv_out_cache = self.conv_out(jax.nn.silu(self.norm_out(x)), conv_out_cache)
        cache = (conv_in_cache, level_caches, mid_cache, conv_out_cache)
        return moments, cache  # (B, T', h, w, 2 * z_dim)


class Decoder(nnx.Module):
    """One chunk of latents (B, t, h, w, z_dim) and the cache of the chunks before -> frames
    (B, T', h * f_s, w * f_s, out_channels), unclamped, and the new cache."""

    def __init__(self, config: WanVAEConfig, **kw):
        base = config.decoder_base_dim or config.base_dim
        multipliers = config.dim_mult[::-1]
        widths = [base * m for m in (multipliers[0], *multipliers)]
        self.conv_in = CausalConv3d(config.z_dim, widths[0], **kw)
        self.mid = MidBlock(widths[0], implementation=config.attention_impl, **kw)
        levels = []
        for i, temporal in enumerate((*config.temporal_downsample[::-1], None)):
            # Every Upsample halves the width, so a level after one starts at half its input.
            in_width = widths[i] if i == 0 else widths[i] // 2
            resample = None if temporal is None else Upsample(widths[i + 1], temporal, **kw)
            blocks = config.num_res_blocks + 1
            levels.append(Level(in_width, widths[i + 1], blocks, resample, **kw))
        self.levels = nnx.List(levels)
        self.norm_out = RMSNorm(widths[-1], **kw)
        self.conv_out = CausalConv3d(widths[-1], config.out_channels, **kw)

    def __call__(self, latents: jax.Array, cache) -> tuple[jax.Array, tuple]:
        conv_in_cache, mid_cache, level_caches, conv_out_cache = _parts(cache, 4)
        x, conv_in_cache = self.conv_in(latents, conv_in_cache)  # (B, t, h, w, widest)
        x, mid_cache = self.mid(x, mid_cache)
        x, level_caches = _chain(self.levels, x, level_caches)  # (B, T', H, W, widths[-1])
        frames, conv_out_cache = self.conv_out(jax.nn.silu(self.norm_out(x)), conv_out_cache)
        cache = (conv_in_cache, mid_cache, level_caches, conv_out_cache)
        return frames, cache  # (B, T', H, W, out_channels)


# One compiled program for the first chunk (cache None: different shapes, no temporal
# resampling) and one for every later chunk (same shapes, the cache a fixed-shape pytree).
# The chunks run in a Python loop rather than a lax.scan because the first chunk is a different
# program; either way only one chunk's activations (plus a few cached frames per layer) are
# alive at a time, which is the point of chunking.
@nnx.jit
def _run_chunk(stage: nnx.Module, inputs: jax.Array, cache):
    return stage(inputs, cache)


class WanAutoencoder(nnx.Module):
    """Clips (B, T, H, W, in_channels) in [-1, 1], T = 1 + 4k, <-> latents
    (B, 1 + (T - 1) / f_t, H / f_s, W / f_s, z_dim)."""

    def __init__(self, config: WanVAEConfig, *, rngs: nnx.Rngs):
        self.config = config
        kw = dict(
            dtype=layers.resolve_dtype(config.dtype),
            param_dtype=layers.resolve_dtype(config.param_dtype),
            rngs=rngs,
        )
        self.encoder = Encoder(config, **kw)
        self.quant_conv = pointwise(2 * config.z_dim, 2 * config.z_dim, **kw)
        self.post_quant_conv = pointwise(config.z_dim, config.z_dim, **kw)
        self.decoder = Decoder(config, **kw)

    def encode(self, clips: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(mean, logvar) of the posterior q(z | clip), each (B, t, h, w, z_dim) in float32,
        logvar clipped to [-30, 20] as diffusers does. Encoded chunk by chunk: the first frame,
        then CHUNK_FRAMES frames at a time."""
        _check_clips(clips, self.config.in_channels, "clips", "in_channels")
        frames = clips.shape[1]
        if frames < 1 or (frames - FIRST_CHUNK_FRAMES) % CHUNK_FRAMES:
            shorter = max(1, frames - (frames - FIRST_CHUNK_FRAMES) % CHUNK_FRAMES)
            raise ValueError(
                f"clips have {frames} frames; the Wan autoencoder encodes 1 + {CHUNK_FRAMES}k "
                f"frames (e.g. {shorter} or {shorter + CHUNK_FRAMES})"
            )
        starts = [0, *range(FIRST_CHUNK_FRAMES, frames, CHUNK_FRAMES)]
        ends = [*starts[1:], frames]
        cache, chunks = None, []
        for start, end in zip(starts, ends, strict=True):
            moments, cache = _run_chunk(self.encoder, clips[:, start:end], cache)
            chunks.append(moments)  # (B, t_chunk, h, w, 2 * z_dim)
        moments = self.quant_conv(jnp.concatenate(chunks, axis=1))  # (B, t, h, w, 2 * z_dim)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)  # (B, t, h, w, z)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Clips (B, 1 + (t - 1) * f_t, h * f_s, w * f_s, out_channels) in [-1, 1] from
        unnormalised latents, decoded one latent frame at a time."""
        _check_clips(latents, self.config.z_dim, "latents", "z_dim")
        latents = self.post_quant_conv(latents)  # (B, t, h, w, z_dim)
        cache, chunks = None, []
        for i in range(latents.shape[1]):
            frames, cache = _run_chunk(self.decoder, latents[:, i : i + 1], cache)
            chunks.append(frames)  # (B, 1 or f_t, H, W, out_channels)
        return jnp.clip(jnp.concatenate(chunks, axis=1), -1.0, 1.0)

    def normalize_latents(self, latents: jax.Array) -> jax.Array:
        """(z - latents_mean) / latents_std per channel: the latents a diffusion model sees."""
        mean = jnp.asarray(self.config.latents_mean, jnp.float32)
        std = jnp.asarray(self.config.latents_std, jnp.float32)
        return ((latents.astype(jnp.float32) - mean) / std).astype(latents.dtype)

    def denormalize_latents(self, latents: jax.Array) -> jax.Array:
        """Inverse of `normalize_latents`: z * latents_std + latents_mean, ready for `decode`."""
        mean = jnp.asarray(self.config.latents_mean, jnp.float32)
        std = jnp.asarray(self.config.latents_std, jnp.float32)
        return (latents.astype(jnp.float32) * std + mean).astype(latents.dtype)

    def __call__(self, clips: jax.Array) -> jax.Array:
        """Reconstruction through the posterior mean (no sampling)."""
        mean, _ = self.encode(clips)
        return self.decode(mean)


def _check_clips(x: jax.Array, channels: int, what: str, field: str) -> None:
    if x.ndim != 5 or x.shape[-1] != channels:
        raise ValueError(
            f"{what} of shape {tuple(x.shape)} are not (batch, frames, height, width, "
            f"{channels}) (config.{field})"
        )
