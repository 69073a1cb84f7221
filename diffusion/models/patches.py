"""Between pixels and tokens: patchify / unpatchify, the two input stems (linear patches and
the early-convolution stem) and the pixel-space output convolution.

Images are NHWC; tokens are (B, T, D) in row-major patch order, each patch's pixels in (p, q, c)
order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion.models.layers import Dense, he_normal, make_param, zeros


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """(B, H, W, C) -> (B, H/p * W/p, p * p * C), patches in row-major order, pixels (p, q, c)."""
    b, h, w, c = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(
            f"image size {h}x{w} is not divisible by the patch size {patch_size}; "
            f"use a height and width that are multiples of {patch_size}"
        )
    x = images.reshape(b, h // patch_size, patch_size, w // patch_size, patch_size, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # (B, H/p, W/p, p, p, C)
    return x.reshape(b, (h // patch_size) * (w // patch_size), patch_size * patch_size * c)


def unpatchify(tokens: jax.Array, patch_size: int, height: int, width: int) -> jax.Array:
    """Inverse of `patchify`: (B, T, p * p * C) -> (B, H, W, C)."""
    b, _, d = tokens.shape
    c = d // (patch_size * patch_size)
    gh, gw = height // patch_size, width // patch_size
    x = tokens.reshape(b, gh, gw, patch_size, patch_size, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # (B, H/p, p, W/p, p, C)
    return x.reshape(b, height, width, c)


def patchify_3d(clips: jax.Array, patch_size: tuple[int, int, int]) -> jax.Array:
    """(B, T, H, W, C) -> (B, T/pt * H/ph * W/pw, pt * ph * pw * C): patches in row-major
    (frame, row, column) order, each patch's values in (pt, ph, pw, c) order, as a Conv3d with
    stride = kernel (Wan's patch embedding) sees them."""
    b, t, h, w, c = clips.shape
    pt, ph, pw = patch_size
    if t % pt or h % ph or w % pw:
        raise ValueError(
            f"clip size {t}x{h}x{w} (frames x height x width) is not divisible by the patch size "
            f"{pt}x{ph}x{pw}; use frames, height and width that are multiples of it"
        )
    x = clips.reshape(b, t // pt, pt, h // ph, ph, w // pw, pw, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)  # (B, T/pt, H/ph, W/pw, pt, ph, pw, C)
    return x.reshape(b, (t // pt) * (h // ph) * (w // pw), pt * ph * pw * c)


def unpatchify_3d(
    tokens: jax.Array, patch_size: tuple[int, int, int], frames: int, height: int, width: int
) -> jax.Array:
    """Inverse of `patchify_3d`: (B, N, pt * ph * pw * C) -> (B, T, H, W, C)."""
    b, _, d = tokens.shape
    pt, ph, pw = patch_size
    c = d // (pt * ph * pw)
    x = tokens.reshape(b, frames // pt, height // ph, width // pw, pt, ph, pw, c)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)  # (B, T/pt, pt, H/ph, ph, W/pw, pw, C)
    return x.reshape(b, frames, height, width, c)


class PatchEmbed(nnx.Module):
    """Non-overlapping p x p patches -> linear tokens (the stride-p convolution of ViT / DiT)."""

    def __init__(
        self,
        patch_size: int,
        in_channels: int,
        width: int,
        *,
        use_bias: bool = True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.patch_size = patch_size
        self.proj = Dense(
            patch_size * patch_size * in_channels,
            width,
            ("patch", "embed"),
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.proj(patchify(images, self.patch_size))  # (B, T, width)


class ConvStem(nnx.Module):
    """Early convolutions in place of a p x p patchify (Xiao et al. 2021, "Early Convolutions
    Help Transformers See Better"): log2(p) 3x3 stride-2 convolutions, each followed by GELU,
    with channels doubling up to width / 2, then a linear projection to the width. The tokens
    are the patchify's (one per p x p cell, row-major), but each sees a 3x3-convolved
    neighbourhood, so edges and outlines that cross patch borders reach the transformer.
    For ViT-B/16 (width 768) the channels are Xiao's 48, 96, 192, 384.

    Clips (B, T, H, W, C): the convolutions run on each frame, and a token joins the features
    of ``frames_per_token`` consecutive frames at its cell before the projection (a Conv3d of
    temporal kernel = stride = frames_per_token as the last layer), so the tokens are
    `patchify_3d`'s for patches (frames_per_token, p, p), in its (frame, row, column) order.
    """

    def __init__(
        self,
        patch_size: int,
        in_channels: int,
        width: int,
        *,
        frames_per_token: int = 1,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.frames_per_token = frames_per_token
        channels = conv_stem_channels(patch_size, in_channels, width)
        self.dtype = dtype
        axes = ("height", "width", "conv_in", "channels")
        self.kernels = nnx.List(
            [
                make_param(rngs, he_normal, (3, 3, c_in, c_out), axes, param_dtype)
                for c_in, c_out in zip(channels[:-1], channels[1:], strict=True)
            ]
        )
        self.biases = nnx.List(
            [make_param(rngs, zeros, (c,), ("channels",), param_dtype) for c in channels[1:]]
        )
        self.proj = Dense(
            frames_per_token * channels[-1], width, ("patch", "embed"), dtype=dtype,
            param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip

    def __call__(self, images: jax.Array) -> jax.Array:
        """(B, H, W, C) images -> (B, (H/p) (W/p), width), or (B, T, H, W, C) clips ->
        (B, (T/pt) (H/p) (W/p), width) with pt = frames_per_token."""
        if images.ndim == 5:
            return self.proj(self._clip_features(images))
        if self.frames_per_token != 1:
            raise ValueError(
                f"a conv stem of {self.frames_per_token} frames per token embeds clips "
                f"(B, T, H, W, C), got an image batch of shape {images.shape}"
            )
        x = self._frame_features(images)
        b, h, w, c = x.shape
        return self.proj(x.reshape(b, h * w, c))  # (B, T, width), T = (H/p) * (W/p)

    def _clip_features(self, clips: jax.Array) -> jax.Array:
        """(B, T, H, W, C) -> (B, (T/pt) h w, pt c): each frame convolved on its own, then the
        pt frames of a token's cell side by side, in patchify_3d's (frame, row, column) order."""
        b, frames, height, width, channels = clips.shape
        pt = self.frames_per_token
        if frames % pt:
            raise ValueError(
                f"{frames} frames are not divisible by the {pt} frames of a token; use a "
                f"multiple of {pt} frames"
            )
        x = self._frame_features(clips.reshape(b * frames, height, width, channels))
        _, h, w, c = x.shape
        x = x.reshape(b, frames // pt, pt, h, w, c).transpose(0, 1, 3, 4, 2, 5)
        return x.reshape(b, (frames // pt) * h * w, pt * c)

    def _frame_features(self, images: jax.Array) -> jax.Array:
        """(N, H, W, C) -> (N, H/p, W/p, width / 2): the stride-2 convolutions and GELUs."""
        x = images.astype(self.dtype)
        for kernel, bias in zip(self.kernels, self.biases, strict=True):
            x = jax.lax.conv_general_dilated(
                x,
                kernel[...].astype(self.dtype),
                window_strides=(2, 2),
                padding=((1, 1), (1, 1)),  # PyTorch's padding=1: kernels centred on pixels
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
            x = jax.nn.gelu(x + bias[...].astype(self.dtype))
        return x


def conv_stem_channels(patch_size: int, in_channels: int, width: int) -> list[int]:
    """Channels of a ConvStem's feature maps, input first: in_channels, then doubling up to
    width / 2, one per stride-2 convolution."""
    num_convs = conv_stem_depth(patch_size, width)
    return [in_channels] + [width >> (num_convs - i) for i in range(num_convs)]


def conv_stem_depth(patch_size: int, width: int) -> int:
    """Stride-2 convolutions of a ConvStem for ``patch_size`` (a power of two, at least 2) and
    a model ``width`` that the stem's channels (width / 2^k ... width / 2) divide."""
    if patch_size < 2 or patch_size & (patch_size - 1):
        raise ValueError(
            f"a conv stem needs a patch size that is a power of two (2, 4, 8, ...), got "
            f"{patch_size}; use the 'patch' stem or change the patch size"
        )
    num_convs = patch_size.bit_length() - 1
    if width % 2**num_convs:
        raise ValueError(
            f"a conv stem for patch {patch_size} halves the width {num_convs} times; width "
            f"{width} is not divisible by {2**num_convs}: use a multiple of {2**num_convs}"
        )
    return num_convs


class PixelConv(nnx.Module):
    """A k x k 'SAME' convolution on images (B, H, W, C) -> (B, H, W, C), identity at init.

    U-ViT (Bao et al. 2023) puts a 3x3 convolution after the patch decoder: each output pixel
    then mixes its neighbours across patch borders, which a per-patch linear decoder cannot.
    Initialised to the identity (centre tap 1, the rest 0) so a model starts as it would
    without it.
    """

    def __init__(
        self, channels: int, kernel_size: int = 3, *, dtype=jnp.float32, param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):  # fmt: skip
        if kernel_size % 2 != 1:
            raise ValueError(
                f"kernel_size must be odd (a centred 'SAME' kernel), got {kernel_size}"
            )
        centre = kernel_size // 2

        def identity(key, shape, dtype):
            del key
            return jnp.zeros(shape, dtype).at[centre, centre].set(jnp.eye(channels, dtype=dtype))

        self.dtype = dtype
        shape = (kernel_size, kernel_size, channels, channels)
        axes = ("height", "width", "conv_in", "channels")
        self.kernel = make_param(rngs, identity, shape, axes, param_dtype)
        self.bias = make_param(rngs, zeros, (channels,), ("channels",), param_dtype)

    def __call__(self, images: jax.Array) -> jax.Array:
        out = jax.lax.conv_general_dilated(
            images.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            window_strides=(1, 1),
            padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return out + self.bias[...].astype(self.dtype)
