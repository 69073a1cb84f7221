"""Import diffusers `AutoencoderKL` checkpoints (`config.json` +
`diffusion_pytorch_model.safetensors`) into our `Autoencoder` (diffusion.models.autoencoder).

The directory is the one `AutoencoderKL.save_pretrained` writes, as in the `vae/` folder of the
hub's Stable Diffusion and Flux repositories. config.json is checked field by field: a field or
value our model cannot reproduce (another block type or activation, per-channel latent
statistics) is refused by name rather than silently ignored; `force_upcast` (a pipeline hint)
and the `_`-prefixed metadata are ignored. Every tensor is mapped by name and checked against
the shape config.json implies; PyTorch convolutions (out, in, kh, kw) become HWIO kernels and
the attention's Linear (out, in) matrices become (in, out). Both attention key layouts are read:
today's `to_q/to_k/to_v/to_out.0` and the legacy `query/key/value/proj_attn` of checkpoints
saved by diffusers before 0.15, which diffusers itself still converts on load.
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
from diffusion.models.autoencoder import Autoencoder, AutoencoderConfig

# diffusers' AutoencoderKL defaults, for fields an older config.json lacks.
DIFFUSERS_DEFAULTS = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
    up_block_types=("UpDecoderBlock2D",), block_out_channels=(64,), layers_per_block=1,
    act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=32,
    scaling_factor=0.18215, shift_factor=None, latents_mean=None, latents_std=None,
    use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True,
)  # fmt: skip
# Fields copied as they are into AutoencoderConfig.
COPIED_FIELDS = (
    "in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
    "norm_num_groups", "scaling_factor", "shift_factor", "use_quant_conv", "use_post_quant_conv",
    "mid_block_add_attention",
)  # fmt: skip
IGNORED_FIELDS = ("force_upcast",)  # tells pipelines to run the VAE in float32; no weights
ACTIVATIONS = ("silu", "swish")  # the same function in diffusers' get_activation
EXECUTION_FIELDS = ("dtype", "param_dtype", "attention_impl")
# Attention projections: ours -> (today's diffusers name, the legacy name).
ATTENTION_NAMES = {
    "query": ("to_q", "query"),
    "key": ("to_k", "key"),
    "value": ("to_v", "value"),
    "out": ("to_out.0", "proj_attn"),
}


# ============================================================================================
# config.json -> AutoencoderConfig
# ============================================================================================


def autoencoder_config_from_diffusers(raw: dict, **execution) -> AutoencoderConfig:
    """Our AutoencoderConfig from an AutoencoderKL config.json dict; refuses what we cannot run."""
    if raw.get("_class_name") != "AutoencoderKL":
        raise CheckpointError(
            f"config.json describes a {raw.get('_class_name')!r}, not an AutoencoderKL "
            "(its _class_name must be 'AutoencoderKL', as diffusers.AutoencoderKL writes it)"
        )
    known = set(DIFFUSERS_DEFAULTS) | set(IGNORED_FIELDS)
    for field in raw:
        if not field.startswith("_") and field not in known:
            raise CheckpointError(
                f"config.json field {field!r} (value {raw[field]!r}) is not supported by our "
                f"autoencoder; supported fields: {sorted(known)}"
            )
    fields = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in raw.items() if k in DIFFUSERS_DEFAULTS}}
    levels = len(fields["block_out_channels"])

    def unsupported(field: str, valid: str) -> CheckpointError:
        return CheckpointError(
            f"config.json field {field!r} = {fields[field]!r} is not supported: {valid}"
        )

    for field, block in (("down_block_types", "DownEncoderBlock2D"),
                         ("up_block_types", "UpDecoderBlock2D")):  # fmt: skip
        if list(fields[field]) != [block] * levels:
            raise unsupported(
                field, f"we need {levels} x {block!r}, one per block_out_channels entry"
            )
    if fields["act_fn"] not in ACTIVATIONS:
        raise unsupported("act_fn", f"valid: {ACTIVATIONS}")
    for field in ("latents_mean", "latents_std"):
        if fields[field] is not None:
            raise unsupported(field, "per-channel latent statistics are not implemented; only null")
    sample_size = fields["sample_size"]
    if isinstance(sample_size, list | tuple):
        if len(set(sample_size)) != 1:
            raise unsupported("sample_size", "only square sample sizes")
        sample_size = sample_size[0]
    try:
        return AutoencoderConfig(
            **{field: fields[field] for field in COPIED_FIELDS},
            sample_size=int(sample_size),
            **execution,
        )
    except (TypeError, ValueError) as error:
        raise CheckpointError(
            f"config.json does not describe a valid autoencoder: {error}"
        ) from error


# ============================================================================================
# Name and layout mapping: diffusers tensor -> our parameter
# ============================================================================================


def _hwio(x: np.ndarray) -> np.ndarray:
    return x.transpose(2, 3, 1, 0)  # PyTorch's (out, in, kh, kw) -> (kh, kw, in, out)


def _conv(ours: tuple, name: str, c_in: int, c_out: int, k: int = 3) -> list[Entry]:
    return [
        ((*ours, "kernel"), f"{name}.weight", (c_out, c_in, k, k), _hwio),
        ((*ours, "bias"), f"{name}.bias", (c_out,), lambda x: x),
    ]


def _norm(ours: tuple, name: str, channels: int) -> list[Entry]:
    return [
        ((*ours, "scale"), f"{name}.weight", (channels,), lambda x: x),
        ((*ours, "bias"), f"{name}.bias", (channels,), lambda x: x),
    ]


def _resnet(ours: tuple, name: str, c_in: int, c_out: int) -> list[Entry]:
    entries = [
        *_norm((*ours, "norm1"), f"{name}.norm1", c_in),
        *_conv((*ours, "conv1"), f"{name}.conv1", c_in, c_out),
        *_norm((*ours, "norm2"), f"{name}.norm2", c_out),
        *_conv((*ours, "conv2"), f"{name}.conv2", c_out, c_out),
    ]
    if c_in != c_out:
        entries += _conv((*ours, "shortcut"), f"{name}.conv_shortcut", c_in, c_out, 1)
    return entries


def _attention(ours: tuple, name: str, channels: int, tensors) -> list[Entry]:
    legacy = f"{name}.query.weight" in tensors and f"{name}.to_q.weight" not in tensors
    entries = _norm((*ours, "norm"), f"{name}.group_norm", channels)
    for projection, names in ATTENTION_NAMES.items():
        theirs = f"{name}.{names[1] if legacy else names[0]}"
        entries += [
            ((*ours, projection, "kernel"), f"{theirs}.weight", (channels, channels), np.transpose),
            ((*ours, projection, "bias"), f"{theirs}.bias", (channels,), lambda x: x),
        ]  # torch Linear stores (out, in); we store (in, out)
    return entries


def _mid(ours: tuple, name: str, channels: int, config: AutoencoderConfig, tensors):
    entries = []
    for i in range(2):
        entries += _resnet((*ours, "resnets", i), f"{name}.resnets.{i}", channels, channels)
    if config.mid_block_add_attention:
        entries += _attention((*ours, "attention"), f"{name}.attentions.0", channels, tensors)
    return entries


def weight_entries(config: AutoencoderConfig, tensors) -> list[Entry]:
    """Every (our path, diffusers name, diffusers shape, conversion) of the model `config` gives.

    `tensors` only decides which attention key layout (today's or the legacy one) to expect.
    """
    c, widths = config, config.block_out_channels
    latent, last = c.latent_channels, len(widths) - 1
    entries = _conv(("encoder", "conv_in"), "encoder.conv_in", c.in_channels, widths[0])
    for i, width in enumerate(widths):
        c_in, prefix = widths[max(i - 1, 0)], f"encoder.down_blocks.{i}"
        for j in range(c.layers_per_block):
            entries += _resnet(("encoder", "levels", i, "resnets", j), f"{prefix}.resnets.{j}",
                               c_in if j == 0 else width, width)  # fmt: skip
        if i < last:
            entries += _conv(("encoder", "levels", i, "conv"), f"{prefix}.downsamplers.0.conv",
                             width, width)  # fmt: skip
    entries += _mid(("encoder", "mid"), "encoder.mid_block", widths[-1], c, tensors)
    entries += _norm(("encoder", "norm_out"), "encoder.conv_norm_out", widths[-1])
    entries += _conv(("encoder", "conv_out"), "encoder.conv_out", widths[-1], 2 * latent)

    reverse = widths[::-1]
    entries += _conv(("decoder", "conv_in"), "decoder.conv_in", latent, reverse[0])
    entries += _mid(("decoder", "mid"), "decoder.mid_block", reverse[0], c, tensors)
    for i, width in enumerate(reverse):
        c_in, prefix = reverse[max(i - 1, 0)], f"decoder.up_blocks.{i}"
        for j in range(c.layers_per_block + 1):
            entries += _resnet(("decoder", "levels", i, "resnets", j), f"{prefix}.resnets.{j}",
                               c_in if j == 0 else width, width)  # fmt: skip
        if i < last:
            entries += _conv(("decoder", "levels", i, "conv"), f"{prefix}.upsamplers.0.conv",
                             width, width)  # fmt: skip
    entries += _norm(("decoder", "norm_out"), "decoder.conv_norm_out", reverse[-1])
    entries += _conv(("decoder", "conv_out"), "decoder.conv_out", reverse[-1], c.out_channels)

    if c.use_quant_conv:
        entries += _conv(("quant_conv",), "quant_conv", 2 * latent, 2 * latent, 1)
    if c.use_post_quant_conv:
        entries += _conv(("post_quant_conv",), "post_quant_conv", latent, latent, 1)
    return entries


def convert_weights(tensors, config: AutoencoderConfig) -> dict[tuple, np.ndarray]:
    """diffusers AutoencoderKL tensors -> {our parameter path: array}, every tensor used once."""
    used: set[str] = set()
    params = convert_entries(tensors, weight_entries(config, tensors), used)
    check_all_used(tensors, used)
    return params


# ============================================================================================
# Public entry point
# ============================================================================================


def load_diffusers_autoencoder(
    directory: str, **execution
) -> tuple[Autoencoder, AutoencoderConfig]:
    """(model, config) from a diffusers AutoencoderKL directory (config.json + safetensors).

    `execution` are AutoencoderConfig fields that do not change the weights: dtype,
    param_dtype, attention_impl.
    """
    if set(execution) - set(EXECUTION_FIELDS):
        raise UserError(
            f"unknown options {sorted(set(execution) - set(EXECUTION_FIELDS))}; "
            f"valid: {sorted(EXECUTION_FIELDS)}"
        )
    AutoencoderConfig(**execution)  # a bad dtype is the caller's mistake, not config.json's
    check_directory(directory, DIFFUSERS)
    config = autoencoder_config_from_diffusers(read_config(directory, DIFFUSERS), **execution)
    tensors = read_safetensors(directory, DIFFUSERS.weights_file, DIFFUSERS.index_file)
    params = convert_weights(tensors, config)
    model = module_with_params(lambda: Autoencoder(config, rngs=nnx.Rngs(0)), params)
    return model, config
