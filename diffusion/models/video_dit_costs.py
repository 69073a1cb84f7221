"""Closed-form costs of the video DiT (diffusion/models/video_dit.py): its parameter count and
the matmul FLOPs of one example's forward, for MFU and the AOT tables of docs/scaling.md. Tests
check both against the model itself (its parameters, the dot_generals of its traced forward) and
against diffusers' WanTransformer3DModel."""

from __future__ import annotations

from diffusion.models import patches
from diffusion.models.video_dit import VideoDiTConfig


def _conv_stem_channels(config: VideoDiTConfig) -> list[tuple[int, int]]:
    """(channels in, channels out) of each convolution of a conv input stem (patches.ConvStem)."""
    channels = patches.conv_stem_channels(config.patch_size[1], config.in_channels, config.width)
    return list(zip(channels[:-1], channels[1:], strict=True))


def _stem_parameters(config: VideoDiTConfig) -> int:
    d, pt = config.width, config.patch_size[0]
    if config.input_stem == "patch":
        return config.patch_volume * config.in_channels * d + d
    convs = _conv_stem_channels(config)
    conv_params = sum(9 * c_in * c_out + c_out for c_in, c_out in convs)
    return conv_params + pt * convs[-1][1] * d + d


def _stem_macs(config: VideoDiTConfig, frames: int, height: int, width: int) -> int:
    """Multiply-adds of the input stem on one clip: the linear patch embedding, or every
    frame's 3x3 stride-2 convolutions and the projection of their features."""
    pt, ph, pw = config.patch_size
    tokens = (frames // pt) * (height // ph) * (width // pw)
    if config.input_stem == "patch":
        return tokens * config.patch_volume * config.in_channels * config.width
    convs = _conv_stem_channels(config)
    macs = 0
    for level, (c_in, c_out) in enumerate(convs, start=1):  # each halves the rows and columns
        macs += frames * (height >> level) * (width >> level) * 9 * c_in * c_out
    return macs + tokens * pt * convs[-1][1] * config.width


def parameter_count(config: VideoDiTConfig) -> int:
    """Number of parameters of VideoDiT(config); diffusers' WanTransformer3DModel of the same
    sizes has as many (it always builds the q/k norms: qk_norm=True)."""
    d, f, p = config.width, config.ffn_dim, config.patch_volume
    linear = lambda n_in, n_out: n_in * n_out + n_out
    attention_params = 4 * linear(d, d) + (2 * d if config.qk_norm else 0)
    block = (
        2 * attention_params
        + (2 * d if config.cross_attn_norm else 0)
        + linear(d, f)
        + linear(f, d)
        + 6 * d
    )
    return (
        _stem_parameters(config)
        + linear(config.freq_dim, d)
        + linear(d, d)
        + linear(d, 6 * d)
        + (2 if config.word_conditioning else 1) * (linear(config.text_dim, d) + linear(d, d))
        + config.depth * block
        + 2 * d
        + linear(d, p * config.out_channels)
    )


def flops_per_example(
    config: VideoDiTConfig, frames: int, height: int, width: int, text_length: int
) -> int:
    """Forward matmul FLOPs (2 x multiply-adds) of one example of frames x height x width with
    text_length text tokens: every projection and convolution, q k^T and the attention-weighted
    values.
    Elementwise work (norms, softmax, RoPE, modulation) is left out, as in MFU accounting
    (Chowdhery et al. 2022, app. B)."""
    pt, ph, pw = config.patch_size
    n = (frames // pt) * (height // ph) * (width // pw)
    d, f, p = config.width, config.ffn_dim, config.patch_volume
    # The keys and values the blocks cross-attend to: the states, then the words if read.
    length = text_length * (2 if config.word_conditioning else 1)
    self_attention = 4 * n * d * d + 2 * n * n * d  # q, k, v, out; q k^T and weights x v
    cross_attention = 2 * n * d * d + 2 * length * d * d + 2 * n * length * d
    ffn = 2 * n * d * f
    block = self_attention + cross_attention + ffn
    time = config.freq_dim * d + d * d + d * 6 * d
    text = length * (config.text_dim * d + d * d)
    macs = _stem_macs(config, frames, height, width) + time + text + config.depth * block
    macs += n * d * p * config.out_channels
    return 2 * macs
