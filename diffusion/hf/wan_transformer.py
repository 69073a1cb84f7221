"""Import diffusers `WanTransformer3DModel` checkpoints (`config.json` +
`diffusion_pytorch_model.safetensors`, or its sharded index) into our `VideoDiT`
(diffusion.models.video_dit).

The directory is the one `WanTransformer3DModel.save_pretrained` writes, as in the `transformer/`
folder of the hub's Wan-AI/Wan2.1-T2V-1.3B-Diffusers and -14B-Diffusers repositories.
config.json is checked field by field: the image-to-video fields (`image_dim`,
`added_kv_proj_dim`, `pos_embed_seq_len`) and any field we do not know are refused by name
rather than silently ignored; the `_`-prefixed metadata is ignored. Every tensor is mapped by
name and checked against the shape config.json implies. Layouts: torch Linear (out, in) becomes
(in, out), split into (heads, head_dim) where our kernels keep heads apart; the patch Conv3d
(D, C, pt, ph, pw) becomes a Dense over patches flattened in (pt, ph, pw, C) order; the
(1, n, D) modulation tables lose their leading 1.

Time: diffusers' model takes timesteps in [0, 1000]; ours takes t in [0, 1] and multiplies by
`time_scale` (1000), so a diffusers timestep s is our t = s / 1000.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from diffusion import sharding
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
from diffusion.models.video_dit import VideoDiT, VideoDiTConfig

WAN_DIFFUSERS = dataclasses.replace(
    DIFFUSERS, loader="diffusers.WanTransformer3DModel.from_pretrained(dir)"
)
CLASS_NAME = "WanTransformer3DModel"
# diffusers' WanTransformer3DModel defaults, for fields a config.json lacks.
DIFFUSERS_DEFAULTS = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
    out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None,
    added_kv_proj_dim=None, rope_max_seq_len=1024, pos_embed_seq_len=None,
)  # fmt: skip
# Fields of image-to-video checkpoints (a CLIP image branch): not implemented, must be null.
IMAGE_FIELDS = ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")
# diffusers' WanAttention builds and applies RMS norms across heads whatever this field says.
QK_NORM = "rms_norm_across_heads"
EXECUTION_FIELDS = ("dtype", "param_dtype", "attention_impl", "remat_policy", "scan_layers")


# ============================================================================================
# config.json -> VideoDiTConfig
# ============================================================================================


def video_dit_config_from_diffusers(raw: dict, **execution) -> VideoDiTConfig:
    """Our VideoDiTConfig from a WanTransformer3DModel config.json dict; refuses what we cannot
    run."""
    if raw.get("_class_name") != CLASS_NAME:
        raise CheckpointError(
            f"config.json describes a {raw.get('_class_name')!r}, not a {CLASS_NAME} (its "
            f"_class_name must be {CLASS_NAME!r}, as diffusers writes it for Wan's transformer/)"
        )
    for field in raw:
        if not field.startswith("_") and field not in DIFFUSERS_DEFAULTS:
            raise CheckpointError(
                f"config.json field {field!r} (value {raw[field]!r}) is not supported by our "
                f"video DiT; supported fields: {sorted(DIFFUSERS_DEFAULTS)}"
            )
    fields = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in raw.items() if k in DIFFUSERS_DEFAULTS}}
    for field in IMAGE_FIELDS:
        if fields[field] is not None:
            raise CheckpointError(
                f"config.json field {field!r} = {fields[field]!r} is not supported: it belongs "
                "to Wan's image-to-video model (a CLIP image branch), which is not implemented; "
                "only text-to-video checkpoints (null) import"
            )
    if fields["qk_norm"] != QK_NORM:
        raise CheckpointError(
            f"config.json field 'qk_norm' = {fields['qk_norm']!r} is not supported: diffusers "
            f"applies RMS norms across heads whatever it says, and only {QK_NORM!r} (Wan 2.1's "
            "value) says so"
        )
    try:
        return VideoDiTConfig(
            in_channels=fields["in_channels"],
            out_channels=fields["out_channels"] or fields["in_channels"],
            patch_size=tuple(fields["patch_size"]),
            width=fields["num_attention_heads"] * fields["attention_head_dim"],
            depth=fields["num_layers"],
            num_heads=fields["num_attention_heads"],
            ffn_dim=fields["ffn_dim"],
            text_dim=fields["text_dim"],
            freq_dim=fields["freq_dim"],
            eps=fields["eps"],
            qk_norm=True,
            cross_attn_norm=bool(fields["cross_attn_norm"]),
            rope_max_seq_len=fields["rope_max_seq_len"],
            **execution,
        )
    except (TypeError, ValueError) as error:
        raise CheckpointError(
            f"config.json does not describe a valid video DiT: {error}"
        ) from error


# ============================================================================================
# Name and layout mapping: diffusers tensor -> our parameter
# ============================================================================================


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _linear(ours: tuple, name: str, n_in: int, n_out: int) -> list[Entry]:
    return [
        ((*ours, "kernel"), f"{name}.weight", (n_out, n_in), np.transpose),
        ((*ours, "bias"), f"{name}.bias", (n_out,), _same),
    ]  # torch Linear stores (out, in); we store (in, out)


def _attention(ours: tuple, name: str, config: VideoDiTConfig) -> list[Entry]:
    d, heads, head_dim = config.width, config.num_heads, config.head_dim
    split = lambda x: x.reshape(heads, head_dim)
    entries = []
    for ours_name, theirs in (("query", "to_q"), ("key", "to_k"), ("value", "to_v")):
        entries += [
            ((*ours, f"{ours_name}_kernel"), f"{name}.{theirs}.weight", (d, d),
             lambda x: x.T.reshape(d, heads, head_dim)),
            ((*ours, f"{ours_name}_bias"), f"{name}.{theirs}.bias", (d,), split),
        ]  # fmt: skip
    entries += [
        ((*ours, "out_kernel"), f"{name}.to_out.0.weight", (d, d),
         lambda x: x.T.reshape(heads, head_dim, d)),
        ((*ours, "out_bias"), f"{name}.to_out.0.bias", (d,), _same),
    ]  # fmt: skip
    if config.qk_norm:
        entries += [
            ((*ours, "query_norm", "scale"), f"{name}.norm_q.weight", (d,), split),
            ((*ours, "key_norm", "scale"), f"{name}.norm_k.weight", (d,), split),
        ]
    return entries


def _patch_kernel(x: np.ndarray) -> np.ndarray:
    """Conv3d (D, C, pt, ph, pw) -> Dense (pt * ph * pw * C, D), patches in (pt, ph, pw, C)."""
    return x.transpose(2, 3, 4, 1, 0).reshape(-1, x.shape[0])


def _block(i: int, config: VideoDiTConfig) -> list[Entry]:
    ours, name, d = ("blocks", "blocks", i), f"blocks.{i}", config.width
    entries = _attention((*ours, "self_attn"), f"{name}.attn1", config)
    entries += _attention((*ours, "cross_attn"), f"{name}.attn2", config)
    if config.cross_attn_norm:
        entries += [
            ((*ours, "norm2", "scale"), f"{name}.norm2.weight", (d,), _same),
            ((*ours, "norm2", "bias"), f"{name}.norm2.bias", (d,), _same),
        ]
    entries += _linear((*ours, "ffn", "fc1"), f"{name}.ffn.net.0.proj", d, config.ffn_dim)
    entries += _linear((*ours, "ffn", "fc2"), f"{name}.ffn.net.2", config.ffn_dim, d)
    entries.append(
        ((*ours, "scale_shift_table"), f"{name}.scale_shift_table", (1, 6, d), lambda x: x[0])
    )
    return entries


def weight_entries(config: VideoDiTConfig) -> list[Entry]:
    """Every (our path, diffusers name, diffusers shape, conversion) of the model `config` gives,
    with the blocks unscanned (paths ("blocks", "blocks", i, ...))."""
    d, p = config.width, config.patch_volume
    conditions = "condition_embedder"
    entries = [
        (("patch_embed", "kernel"), "patch_embedding.weight",
         (d, config.in_channels, *config.patch_size), _patch_kernel),
        (("patch_embed", "bias"), "patch_embedding.bias", (d,), _same),
    ]  # fmt: skip
    entries += _linear(("time_embed", "fc1"), f"{conditions}.time_embedder.linear_1",
                       config.freq_dim, d)  # fmt: skip
    entries += _linear(("time_embed", "fc2"), f"{conditions}.time_embedder.linear_2", d, d)
    entries += _linear(("time_embed", "projection"), f"{conditions}.time_proj", d, 6 * d)
    entries += _linear(("text_embed", "fc1"), f"{conditions}.text_embedder.linear_1",
                       config.text_dim, d)  # fmt: skip
    entries += _linear(("text_embed", "fc2"), f"{conditions}.text_embedder.linear_2", d, d)
    for i in range(config.depth):
        entries += _block(i, config)
    entries.append(
        (("final_layer", "scale_shift_table"), "scale_shift_table", (1, 2, d), lambda x: x[0])
    )
    entries += _linear(("final_layer", "linear"), "proj_out", d, p * config.out_channels)
    return entries


def stack_blocks(params: dict[tuple, np.ndarray], depth: int) -> dict[tuple, np.ndarray]:
    """Unscanned block paths ("blocks", "blocks", i, *rest) -> one scanned path
    ("blocks", "blocks", *rest) holding block i at index i of the leading 'layers' axis."""
    stacked, per_block = {}, {}
    for path, value in params.items():
        if path[:2] == ("blocks", "blocks"):
            per_block.setdefault((*path[:2], *path[3:]), {})[path[2]] = value
        else:
            stacked[path] = value
    for path, blocks in per_block.items():
        stacked[path] = np.stack([blocks[i] for i in range(depth)])
    return stacked


def convert_weights(tensors, config: VideoDiTConfig) -> dict[tuple, np.ndarray]:
    """diffusers WanTransformer3DModel tensors (numpy arrays, or torch tensors of a
    `state_dict()`) -> {our parameter path: array}, every tensor used once; blocks stacked when
    `config.scan_layers`."""
    tensors = {name: _as_numpy(value) for name, value in tensors.items()}
    used: set[str] = set()
    params = convert_entries(tensors, weight_entries(config), used)
    check_all_used(tensors, used)
    return stack_blocks(params, config.depth) if config.scan_layers else params


def _as_numpy(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # a torch tensor; float() also reads bfloat16
        return value.detach().cpu().float().numpy()
    return np.asarray(value)


def video_dit_from_state_dict(
    tensors,
    config: VideoDiTConfig,
    mesh: Mesh | None = None,
    rules: sharding.LogicalRules = sharding.DEFAULT_RULES,
) -> VideoDiT:
    """Our VideoDiT (never initialised) holding a diffusers WanTransformer3DModel state dict;
    with a `mesh`, each weight placed on its shards (its logical names under `rules`)."""
    params = convert_weights(tensors, config)
    return module_with_params(
        lambda: VideoDiT(config, rngs=nnx.Rngs(0)), params, mesh=mesh, rules=rules
    )


# ============================================================================================
# Public entry point
# ============================================================================================


def load_diffusers_wan_transformer(
    directory: str,
    mesh: Mesh | None = None,
    rules: sharding.LogicalRules = sharding.DEFAULT_RULES,
    **execution,
) -> tuple[VideoDiT, VideoDiTConfig]:
    """(model, config) from a diffusers WanTransformer3DModel directory (config.json +
    safetensors). mesh: place every weight on its shards as it is read (the 14B model need not
    fit one device), by its logical names under `rules`.

    `execution` are VideoDiTConfig fields that do not change the weights: dtype, param_dtype,
    attention_impl, remat_policy, scan_layers.
    """
    if set(execution) - set(EXECUTION_FIELDS):
        raise UserError(
            f"unknown options {sorted(set(execution) - set(EXECUTION_FIELDS))}; "
            f"valid: {sorted(EXECUTION_FIELDS)}"
        )
    VideoDiTConfig(**execution)  # a bad dtype is the caller's mistake, not config.json's
    check_directory(directory, WAN_DIFFUSERS)
    config = video_dit_config_from_diffusers(read_config(directory, WAN_DIFFUSERS), **execution)
    tensors = read_safetensors(directory, WAN_DIFFUSERS.weights_file, WAN_DIFFUSERS.index_file)
    return video_dit_from_state_dict(tensors, config, mesh, rules), config
