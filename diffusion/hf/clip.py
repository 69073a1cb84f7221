"""Import Hugging Face CLIP checkpoints (`config.json` + `model.safetensors`) into our CLIP.

The directory layout is the one `transformers.CLIPModel.save_pretrained` writes (and the hub's
openai/clip-vit-base-patch32 and friends use). Pickled `.bin` weights are refused: unpickling
can run arbitrary code.

Numerics are identical to `transformers`: the activation (quick_gelu / gelu), LayerNorm eps and
projection sizes come from the config, and the pixel normalisation of the checkpoint's
`preprocessor_config.json` (OpenAI's mean/std when absent) is stored in `CLIPConfig.pixel_mean`
/ `pixel_std` and applied inside `CLIP.encode_image`, which takes our [-1, 1] images. Text
pooling takes the last unmasked token, which is HF's end-of-text token whenever the mask marks
the tokenizer's output (BOS ... EOS, then padding).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np
from flax import nnx

from diffusion.errors import UserError
from diffusion.hf.files import (
    TRANSFORMERS,
    CheckpointError,
    Entry,
    check_all_used,
    check_directory,
    convert_entries,
    module_with_params,
    read_config,
    read_safetensors,
)
from diffusion.models.clip import CLIP, CLIPConfig

# OpenAI's CLIP preprocessing, used when the checkpoint has no preprocessor_config.json.
OPENAI_PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)
# HF activation names -> ours.
HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh"}
# Buffers some transformers versions save that carry no weights.
IGNORED_TENSOR_SUFFIXES = ("position_ids",)


# ============================================================================================
# Config: config.json and preprocessor_config.json
# ============================================================================================


def _pixel_normalisation(directory: str) -> tuple[tuple, tuple]:
    path = os.path.join(directory, "preprocessor_config.json")
    if not os.path.exists(path):
        return OPENAI_PIXEL_MEAN, OPENAI_PIXEL_STD
    with open(path) as f:
        pre = json.load(f)
    return (
        tuple(pre.get("image_mean", OPENAI_PIXEL_MEAN)),
        tuple(pre.get("image_std", OPENAI_PIXEL_STD)),
    )


def clip_config_from_hf(hf_config, pixel_mean=OPENAI_PIXEL_MEAN, pixel_std=OPENAI_PIXEL_STD,
                        **execution) -> CLIPConfig:  # fmt: skip
    """Our CLIPConfig from a `transformers.CLIPConfig`; `execution` sets dtype, scan_layers..."""
    vision, text = hf_config.vision_config, hf_config.text_config
    for tower in (vision, text):
        if tower.hidden_act not in HF_ACTIVATIONS:
            raise CheckpointError(
                f"unsupported hidden_act {tower.hidden_act!r}; supported: {sorted(HF_ACTIVATIONS)}"
            )
    text_activation = None  # one activation per tower, as transformers allows
    if text.hidden_act != vision.hidden_act:
        text_activation = HF_ACTIVATIONS[text.hidden_act]
    if vision.layer_norm_eps != text.layer_norm_eps:
        raise CheckpointError(
            f"the towers use different layer_norm_eps ({vision.layer_norm_eps} vs "
            f"{text.layer_norm_eps}); our CLIP has one"
        )
    return CLIPConfig(
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        in_channels=vision.num_channels,
        vision_width=vision.hidden_size,
        vision_depth=vision.num_hidden_layers,
        vision_heads=vision.num_attention_heads,
        vision_mlp_dim=vision.intermediate_size,
        vision_pooling="class",
        vocab_size=text.vocab_size,
        context_length=text.max_position_embeddings,
        text_width=text.hidden_size,
        text_depth=text.num_hidden_layers,
        text_heads=text.num_attention_heads,
        text_mlp_dim=text.intermediate_size,
        embed_dim=hf_config.projection_dim,
        activation=HF_ACTIVATIONS[vision.hidden_act],
        text_activation=text_activation,
        layer_norm_eps=vision.layer_norm_eps,
        pixel_mean=tuple(float(v) for v in pixel_mean),
        pixel_std=tuple(float(v) for v in pixel_std),
        logit_scale_init=float(hf_config.logit_scale_init_value),
        **execution,
    )


# ============================================================================================
# Name and layout mapping: HF tensor -> our parameter
# ============================================================================================


def _identity(x):
    return x


def _transpose(x):
    return x.T  # torch Linear stores (out, in); we store (in, out)


def _block_entries(hf_prefix: str, width: int, heads: int, mlp_dim: int) -> list[Entry]:
    """Entries of one transformer block, paths relative to the block."""
    head_dim = width // heads
    in_proj = lambda x: x.T.reshape(width, heads, head_dim)  # (out, in) -> (in, H, Dh)
    out_proj = lambda x: x.T.reshape(heads, head_dim, width)  # (out, H*Dh) -> (H, Dh, out)
    per_head_bias = lambda x: x.reshape(heads, head_dim)
    entries = []
    for ours, hf in (("ln1", "layer_norm1"), ("ln2", "layer_norm2")):
        entries.append(((ours, "scale"), f"{hf_prefix}.{hf}.weight", (width,), _identity))
        entries.append(((ours, "bias"), f"{hf_prefix}.{hf}.bias", (width,), _identity))
    for ours, hf in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        name = f"{hf_prefix}.self_attn.{hf}"
        entries.append((("attn", f"{ours}_kernel"), f"{name}.weight", (width, width), in_proj))
        entries.append((("attn", f"{ours}_bias"), f"{name}.bias", (width,), per_head_bias))
    name = f"{hf_prefix}.self_attn.out_proj"
    entries.append((("attn", "out_kernel"), f"{name}.weight", (width, width), out_proj))
    entries.append((("attn", "out_bias"), f"{name}.bias", (width,), _identity))
    for ours, hf, shape in (("fc1", "fc1", (mlp_dim, width)), ("fc2", "fc2", (width, mlp_dim))):
        entries.append((("mlp", ours, "kernel"), f"{hf_prefix}.mlp.{hf}.weight", shape, _transpose))
        entries.append((("mlp", ours, "bias"), f"{hf_prefix}.mlp.{hf}.bias", shape[:1], _identity))
    return entries


def _norm_entries(ours: tuple, hf: str, width: int) -> list[Entry]:
    return [
        ((*ours, "scale"), f"{hf}.weight", (width,), _identity),
        ((*ours, "bias"), f"{hf}.bias", (width,), _identity),
    ]


def weight_entries(config: CLIPConfig) -> tuple[list[Entry], list[tuple]]:
    """(non-block entries, per-tower block specs) mapping HF names to our parameter paths."""
    c = config
    p, ch, w = c.patch_size, c.in_channels, c.vision_width
    # (W, C, p, p) conv weight -> (p, p, C, W) -> (p*p*C, W), matching `layers.patchify` order.
    patch = lambda x: x.transpose(2, 3, 1, 0).reshape(p * p * ch, w)
    entries: list[Entry] = [
        (
            ("vision", "patch_embed", "proj", "kernel"),
            "vision_model.embeddings.patch_embedding.weight",
            (w, ch, p, p),
            patch,
        ),
        (
            ("vision", "class_embedding"),
            "vision_model.embeddings.class_embedding",
            (w,),
            _identity,
        ),
        (
            ("vision", "position", "embedding"),
            "vision_model.embeddings.position_embedding.weight",
            (c.num_patches + 1, w),
            _identity,
        ),
        *_norm_entries(("vision", "pre_norm"), "vision_model.pre_layrnorm", w),
        *_norm_entries(("vision", "post_norm"), "vision_model.post_layernorm", w),
        (
            ("text", "token_embed", "embedding"),
            "text_model.embeddings.token_embedding.weight",
            (c.vocab_size, c.text_width),
            _identity,
        ),
        (
            ("text", "position", "embedding"),
            "text_model.embeddings.position_embedding.weight",
            (c.context_length, c.text_width),
            _identity,
        ),
        *_norm_entries(("text", "final_norm"), "text_model.final_layer_norm", c.text_width),
        (
            ("vision_projection", "kernel"),
            "visual_projection.weight",
            (c.embed_dim, w),
            _transpose,
        ),
        (
            ("text_projection", "kernel"),
            "text_projection.weight",
            (c.embed_dim, c.text_width),
            _transpose,
        ),
        (("logit_scale",), "logit_scale", (), _identity),
    ]
    towers = [
        (
            "vision",
            "vision_model",
            c.vision_width,
            c.vision_heads,
            c.vision_mlp_dim,
            c.vision_depth,
        ),
        ("text", "text_model", c.text_width, c.text_heads, c.text_mlp_dim, c.text_depth),
    ]
    return entries, towers


def convert_weights(
    tensors: Mapping[str, np.ndarray], config: CLIPConfig
) -> dict[tuple, np.ndarray]:
    """HF CLIPModel tensors -> {our parameter path: array}; layout depends on scan_layers."""
    entries, towers = weight_entries(config)
    used: set[str] = set()
    params = convert_entries(tensors, entries, used)
    for tower, hf_tower, width, heads, mlp_dim, depth in towers:
        per_layer = [
            convert_entries(
                tensors, _block_entries(f"{hf_tower}.encoder.layers.{i}", width, heads, mlp_dim),
                used,
            )
            for i in range(depth)
        ]  # fmt: skip
        for path in per_layer[0] if per_layer else ():
            if config.scan_layers:
                params[(tower, "blocks", "blocks", *path)] = np.stack([p[path] for p in per_layer])
            else:
                for i, layer in enumerate(per_layer):
                    params[(tower, "blocks", "blocks", i, *path)] = layer[path]
    check_all_used(tensors, used, IGNORED_TENSOR_SUFFIXES)
    return params


# ============================================================================================
# Public entry point
# ============================================================================================


def text_context_length(directory: str) -> int:
    """Tokens the text tower of a Hugging Face CLIP directory reads: its position table."""
    check_directory(directory, TRANSFORMERS)
    import transformers

    text = transformers.CLIPConfig.from_pretrained(directory).text_config
    return int(text.max_position_embeddings)


def load_hf_clip(directory: str, **execution) -> CLIP:
    """Build our CLIP from a Hugging Face CLIP directory (config.json + model.safetensors).

    `execution` are CLIPConfig fields that do not change the weights: dtype, param_dtype,
    attention_impl, remat_policy, scan_layers.
    """
    allowed = {"dtype", "param_dtype", "attention_impl", "remat_policy", "scan_layers"}
    if set(execution) - allowed:
        raise UserError(
            f"unknown options {sorted(set(execution) - allowed)}; valid: {sorted(allowed)}"
        )
    check_directory(directory, TRANSFORMERS)
    raw = read_config(directory, TRANSFORMERS)
    if raw.get("model_type") != "clip":
        raise CheckpointError(
            f"{directory!r} holds a {raw.get('model_type')!r} model, not a CLIP model "
            "(config.json model_type must be 'clip', as written by transformers.CLIPModel)"
        )
    import transformers

    hf_config = transformers.CLIPConfig.from_pretrained(directory)
    mean, std = _pixel_normalisation(directory)
    config = clip_config_from_hf(hf_config, mean, std, **execution)
    params = convert_weights(read_safetensors(directory), config)
    return module_with_params(lambda: CLIP(config, rngs=nnx.Rngs(0)), params)
