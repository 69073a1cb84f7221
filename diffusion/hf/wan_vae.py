"""Import diffusers `AutoencoderKLWan` checkpoints (`config.json` +
`diffusion_pytorch_model.safetensors`) into our `WanAutoencoder` (diffusion.models.wan_vae).

The directory is the one `AutoencoderKLWan.save_pretrained` writes, as in the `vae/` folder of
Wan-AI/Wan2.1-T2V-*-Diffusers. config.json is checked field by field: what Wan 2.2's autoencoder
adds (`is_residual`, `patch_size`), attention inside the levels (`attn_scales`) and compression
factors that disagree with the architecture are refused by name; `dropout` (training only) and
the `_`-prefixed metadata are ignored. Every tensor is mapped by name and checked against the
shape config.json implies: PyTorch Conv3d kernels (out, in, kt, kh, kw) become (kt, kh, kw, in,
out), Conv2d kernels (out, in, kh, kw) become HWIO, 1x1(x1) convolutions become Dense (in, out)
matrices, and the norms' (C, 1, 1[, 1]) gammas become (C,) scales.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from diffusion.errors import UserError
from diffusion.hf.files import (
    DIFFUSERS,
    CheckpointError,
    Entry,
    check_all_used,
    check_directory,
    convert_entries,
    module_with_params,
    read_config,
    read_safetensors,
)
from diffusion.models.wan_vae import WanAutoencoder, WanVAEConfig

# diffusers' AutoencoderKLWan defaults (Wan 2.1's sizes), for fields a config.json leaves out.
DIFFUSERS_DEFAULTS = dict(
    base_dim=96, decoder_base_dim=None, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
    attn_scales=(), temperal_downsample=(False, True, True), dropout=0.0,
    latents_mean=None, latents_std=None, is_residual=False, in_channels=3, out_channels=3,
    patch_size=None, scale_factor_temporal=4, scale_factor_spatial=8,
)  # fmt: skip
# diffusers' field name -> ours, for the fields copied as they are.
COPIED_FIELDS = {
    "base_dim": "base_dim",
    "decoder_base_dim": "decoder_base_dim",
    "z_dim": "z_dim",
    "dim_mult": "dim_mult",
    "num_res_blocks": "num_res_blocks",
    "temperal_downsample": "temporal_downsample",  # diffusers' spelling
    "in_channels": "in_channels",
    "out_channels": "out_channels",
    "latents_mean": "latents_mean",
    "latents_std": "latents_std",
}
IGNORED_FIELDS = ("dropout",)  # a training-time rate; inference never drops
EXECUTION_FIELDS = ("dtype", "param_dtype", "attention_impl")


# ============================================================================================
# config.json -> WanVAEConfig
# ============================================================================================


def wan_vae_config_from_diffusers(raw: dict, **execution) -> WanVAEConfig:
    """Our WanVAEConfig from an AutoencoderKLWan config.json dict; refuses what we cannot run."""
    if raw.get("_class_name") != "AutoencoderKLWan":
        raise CheckpointError(
            f"config.json describes a {raw.get('_class_name')!r}, not an AutoencoderKLWan "
            "(its _class_name must be 'AutoencoderKLWan', as diffusers.AutoencoderKLWan writes it)"
        )
    for field in raw:
        if not field.startswith("_") and field not in DIFFUSERS_DEFAULTS:
            raise CheckpointError(
                f"config.json field {field!r} (value {raw[field]!r}) is not supported by our Wan "
                f"autoencoder; supported fields: {sorted(DIFFUSERS_DEFAULTS)}"
            )
    fields = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in raw.items() if k in DIFFUSERS_DEFAULTS}}

    def refuse(field: str, valid: str) -> CheckpointError:
        return CheckpointError(
            f"config.json field {field!r} = {fields[field]!r} is not supported: {valid}"
        )

    if fields["is_residual"]:
        raise refuse("is_residual", "only Wan 2.1's plain blocks (false), not Wan 2.2's")
    if fields["patch_size"] is not None:
        raise refuse("patch_size", "only null (Wan 2.2's patchified input is not implemented)")
    if list(fields["attn_scales"]):
        raise refuse("attn_scales", "only [] (attention inside the levels, as Wan 2.1 has none)")
    try:
        config = WanVAEConfig(
            **{ours: fields[theirs] for theirs, ours in COPIED_FIELDS.items()}, **execution
        )
    except (TypeError, ValueError) as error:
        raise CheckpointError(
            f"config.json does not describe a valid Wan autoencoder: {error}"
        ) from error
    for field, implied in (("scale_factor_spatial", config.spatial_factor),
                           ("scale_factor_temporal", config.temporal_factor)):  # fmt: skip
        if fields[field] is not None and fields[field] != implied:
            raise refuse(field, f"dim_mult and temperal_downsample imply {implied}")
    return config


# ============================================================================================
# Name and layout mapping: diffusers tensor -> our parameter
# ============================================================================================


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _thwio(x: np.ndarray) -> np.ndarray:
    return x.transpose(2, 3, 4, 1, 0)  # (out, in, kt, kh, kw) -> (kt, kh, kw, in, out)


def _hwio(x: np.ndarray) -> np.ndarray:
    return x.transpose(2, 3, 1, 0)  # (out, in, kh, kw) -> (kh, kw, in, out)


def _matrix(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[:2]).T  # (out, in, 1, 1[, 1]) -> (in, out)


def _flat(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1)  # a gamma of shape (C, 1, 1[, 1]) -> (C,)


def _bias(ours: tuple, name: str, channels: int) -> Entry:
    return ((*ours, "bias"), f"{name}.bias", (channels,), _same)


def _conv3d(ours: tuple, name: str, c_in: int, c_out: int, kernel=(3, 3, 3)) -> list[Entry]:
    return [
        ((*ours, "kernel"), f"{name}.weight", (c_out, c_in, *kernel), _thwio),
        _bias(ours, name, c_out),
    ]


def _causal(ours: tuple, name: str, c_in: int, c_out: int, kernel=(3, 3, 3)) -> list[Entry]:
    return _conv3d((*ours, "conv"), name, c_in, c_out, kernel)


def _conv2d(ours: tuple, name: str, c_in: int, c_out: int) -> list[Entry]:
    return [((*ours, "kernel"), f"{name}.weight", (c_out, c_in, 3, 3), _hwio),
            _bias(ours, name, c_out)]  # fmt: skip


def _pointwise(ours: tuple, name: str, c_in: int, c_out: int, dims: int = 3) -> list[Entry]:
    return [
        ((*ours, "kernel"), f"{name}.weight", (c_out, c_in, *(1,) * dims), _matrix),
        _bias(ours, name, c_out),
    ]


def _norm(ours: tuple, name: str, channels: int, dims: int = 3) -> list[Entry]:
    return [((*ours, "scale"), f"{name}.gamma", (channels, *(1,) * dims), _flat)]


def _resnet(ours: tuple, name: str, c_in: int, c_out: int) -> list[Entry]:
    entries = [
        *_norm((*ours, "norm1"), f"{name}.norm1", c_in),
        *_causal((*ours, "conv1"), f"{name}.conv1", c_in, c_out),
        *_norm((*ours, "norm2"), f"{name}.norm2", c_out),
        *_causal((*ours, "conv2"), f"{name}.conv2", c_out, c_out),
    ]
    if c_in != c_out:
        entries += _pointwise((*ours, "shortcut"), f"{name}.conv_shortcut", c_in, c_out)
    return entries


def _mid(ours: tuple, name: str, channels: int) -> list[Entry]:
    attention = f"{name}.attentions.0"
    return [
        *_resnet((*ours, "resnets", 0), f"{name}.resnets.0", channels, channels),
        *_norm((*ours, "attention", "norm"), f"{attention}.norm", channels, dims=2),
        *_pointwise((*ours, "attention", "qkv"), f"{attention}.to_qkv", channels, 3 * channels, 2),
        *_pointwise((*ours, "attention", "out"), f"{attention}.proj", channels, channels, 2),
        *_resnet((*ours, "resnets", 1), f"{name}.resnets.1", channels, channels),
    ]


def _encoder(c: WanVAEConfig) -> list[Entry]:
    widths = [c.base_dim * m for m in (1, *c.dim_mult)]
    entries = _causal(("encoder", "conv_in"), "encoder.conv_in", c.in_channels, widths[0])
    block = 0  # diffusers numbers resnets and resamplers of all levels in one list
    for i in range(len(c.dim_mult)):
        for j in range(c.num_res_blocks):
            entries += _resnet(("encoder", "levels", i, "resnets", j),
                               f"encoder.down_blocks.{block}",
                               widths[i] if j == 0 else widths[i + 1], widths[i + 1])  # fmt: skip
            block += 1
        if i < len(c.dim_mult) - 1:
            ours, name = ("encoder", "levels", i, "resample"), f"encoder.down_blocks.{block}"
            width = widths[i + 1]
            entries += _conv2d((*ours, "spatial"), f"{name}.resample.1", width, width)
            if c.temporal_downsample[i]:
                entries += _conv3d((*ours, "temporal"), f"{name}.time_conv", width, width,
                                   (3, 1, 1))  # fmt: skip
            block += 1
    entries += _mid(("encoder", "mid"), "encoder.mid_block", widths[-1])
    entries += _norm(("encoder", "norm_out"), "encoder.norm_out", widths[-1])
    entries += _causal(("encoder", "conv_out"), "encoder.conv_out", widths[-1], 2 * c.z_dim)
    return entries


def _decoder(c: WanVAEConfig) -> list[Entry]:
    multipliers = c.dim_mult[::-1]
    widths = [(c.decoder_base_dim or c.base_dim) * m for m in (multipliers[0], *multipliers)]
    temporal_upsample = c.temporal_downsample[::-1]
    entries = _causal(("decoder", "conv_in"), "decoder.conv_in", c.z_dim, widths[0])
    entries += _mid(("decoder", "mid"), "decoder.mid_block", widths[0])
    for i in range(len(multipliers)):
        c_in = widths[i] if i == 0 else widths[i] // 2  # an Upsample halves the width
        width, prefix = widths[i + 1], f"decoder.up_blocks.{i}"
        for j in range(c.num_res_blocks + 1):
            entries += _resnet(("decoder", "levels", i, "resnets", j), f"{prefix}.resnets.{j}",
                               c_in if j == 0 else width, width)  # fmt: skip
        if i < len(multipliers) - 1:
            ours, name = ("decoder", "levels", i, "resample"), f"{prefix}.upsamplers.0"
            if temporal_upsample[i]:
                entries += _causal((*ours, "temporal"), f"{name}.time_conv", width, 2 * width,
                                   (3, 1, 1))  # fmt: skip
            entries += _conv2d((*ours, "spatial"), f"{name}.resample.1", width, width // 2)
    entries += _norm(("decoder", "norm_out"), "decoder.norm_out", widths[-1])
    entries += _causal(("decoder", "conv_out"), "decoder.conv_out", widths[-1], c.out_channels)
    return entries


def weight_entries(config: WanVAEConfig) -> list[Entry]:
    """Every (our path, diffusers name, diffusers shape, conversion) of the model `config` gives."""
    z = config.z_dim
    return [
        *_encoder(config),
        *_pointwise(("quant_conv",), "quant_conv", 2 * z, 2 * z),
        *_pointwise(("post_quant_conv",), "post_quant_conv", z, z),
        *_decoder(config),
    ]


def convert_weights(tensors, config: WanVAEConfig) -> dict[tuple, np.ndarray]:
    """diffusers AutoencoderKLWan tensors -> {our parameter path: array}, every tensor used once."""
    used: set[str] = set()
    params = convert_entries(tensors, weight_entries(config), used)
    check_all_used(tensors, used)
    return params


# ============================================================================================
# Public entry point
# ============================================================================================


def load_diffusers_wan_vae(directory: str, **execution) -> tuple[WanAutoencoder, WanVAEConfig]:
    """(model, config) from a diffusers AutoencoderKLWan directory (config.json + safetensors).

    `execution` are WanVAEConfig fields that do not change the weights: dtype, param_dtype,
    attention_impl.
    """
    if set(execution) - set(EXECUTION_FIELDS):
        raise UserError(
            f"unknown options {sorted(set(execution) - set(EXECUTION_FIELDS))}; "
            f"valid: {sorted(EXECUTION_FIELDS)}"
        )
    WanVAEConfig(**execution)  # a bad dtype is the caller's mistake, not config.json's
    check_directory(directory, DIFFUSERS)
    config = wan_vae_config_from_diffusers(read_config(directory, DIFFUSERS), **execution)
    tensors = read_safetensors(directory, DIFFUSERS.weights_file, DIFFUSERS.index_file)
    params = convert_weights(tensors, config)
    model = module_with_params(lambda: WanAutoencoder(config, rngs=nnx.Rngs(0)), params)
    return model, config
