"""Closed-form costs of the video DiT (diffusion/models/video_dit.py): its parameter count and
the matmul FLOPs of one example's forward, for MFU and the AOT tables of docs/scaling.md. Tests
check both against the model itself (its parameters, the dot_generals of its traced forward) and
against diffusers' WanTransformer3DModel."""

from __future__ import annotations

from diffusion.models.video_dit import VideoDiTConfig


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
        linear(p * config.in_channels, d)
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
    text_length text tokens: every projection, q k^T and the attention-weighted values.
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
    macs = n * p * config.in_channels * d + time + text + config.depth * block
    macs += n * d * p * config.out_channels
    return 2 * macs
