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
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion.errors import UserError
from diffusion.models.clip import CLIP, CLIPConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# OpenAI's CLIP preprocessing, used when the checkpoint has no preprocessor_config.json.
OPENAI_PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)
# HF activation names -> ours.
HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh"}
# Buffers some transformers versions save that carry no weights.
IGNORED_TENSOR_SUFFIXES = ("position_ids",)


class CheckpointError(UserError):
    """The checkpoint directory or its contents cannot be imported."""


# ============================================================================================
# Reading the directory
# ============================================================================================


def _check_directory(directory: str) -> None:
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory {directory!r} does not exist")
    files = set(os.listdir(directory))
    if CONFIG_FILE not in files:
        raise CheckpointError(
            f"{directory!r} has no {CONFIG_FILE}; expected a directory written by "
            f"transformers' save_pretrained (found: {sorted(files)})"
        )
    if WEIGHTS_FILE not in files and WEIGHTS_INDEX_FILE not in files:
        if files & set(PICKLED_WEIGHTS):
            pickled = sorted(files & set(PICKLED_WEIGHTS))
            raise CheckpointError(
                f"{directory!r} only has pickled PyTorch weights ({pickled}); pickled weights are "
                "refused because unpickling can run arbitrary code. Convert them once in a trusted "
                "environment: `m = transformers.CLIPModel.from_pretrained(dir)` then "
                f"`m.save_pretrained(dir, safe_serialization=True)`, which writes {WEIGHTS_FILE}"
            )
        raise CheckpointError(
            f"{directory!r} has no {WEIGHTS_FILE} (or {WEIGHTS_INDEX_FILE}); found {sorted(files)}"
        )


def read_safetensors(directory: str) -> dict[str, np.ndarray]:
    """All tensors of model.safetensors (or the shards of its index) as float32/int numpy."""
    from safetensors import SafetensorError, safe_open

    index_path = os.path.join(directory, WEIGHTS_INDEX_FILE)
    if os.path.exists(os.path.join(directory, WEIGHTS_FILE)):
        shards = [WEIGHTS_FILE]
    else:
        with open(index_path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    tensors = {}
    for shard in shards:
        path = os.path.join(directory, shard)
        try:
            # The flax framework reads bfloat16 too (numpy has no bfloat16).
            with safe_open(path, framework="flax") as f:
                for name in f.keys():
                    value = np.asarray(f.get_tensor(name))
                    if np.issubdtype(value.dtype, np.floating) or value.dtype.name == "bfloat16":
                        value = value.astype(np.float32)
                    tensors[name] = value
        except (SafetensorError, OSError) as error:
            state = (
                f"is truncated or damaged ({os.path.getsize(path)} bytes; an interrupted "
                "download or copy)"
                if os.path.isfile(path)
                else f"is missing ({WEIGHTS_INDEX_FILE} names it)"
            )
            raise CheckpointError(
                f"cannot read the weights file {path!r}: {error}. The file {state}; download it "
                "again, or re-save the model with save_pretrained(dir, safe_serialization=True)"
            ) from error
    return tensors


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

# (our path, HF name, expected HF shape, conversion HF layout -> ours)
Entry = tuple[tuple, str, tuple, Callable[[np.ndarray], np.ndarray]]


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


def _take(tensors: Mapping[str, np.ndarray], name: str, hf_shape: tuple, used: set) -> np.ndarray:
    if name not in tensors:
        raise CheckpointError(
            f"tensor {name!r} (expected shape {hf_shape} from config.json) is missing from the "
            "safetensors file; the config and the weights do not belong together"
        )
    value = tensors[name]
    if tuple(value.shape) != tuple(hf_shape):
        raise CheckpointError(
            f"tensor {name!r} has shape {tuple(value.shape)} in the safetensors file but "
            f"config.json implies {tuple(hf_shape)}; the config and the weights do not match"
        )
    used.add(name)
    return value


def convert_weights(
    tensors: Mapping[str, np.ndarray], config: CLIPConfig
) -> dict[tuple, np.ndarray]:
    """HF CLIPModel tensors -> {our parameter path: array}; layout depends on scan_layers."""
    entries, towers = weight_entries(config)
    used: set[str] = set()
    params = {}
    for path, name, shape, convert in entries:
        params[path] = convert(_take(tensors, name, shape, used))
    for tower, hf_tower, width, heads, mlp_dim, depth in towers:
        per_layer = []
        for i in range(depth):
            block = _block_entries(f"{hf_tower}.encoder.layers.{i}", width, heads, mlp_dim)
            per_layer.append(
                {
                    path: convert(_take(tensors, name, shape, used))
                    for path, name, shape, convert in block
                }
            )
        for path in per_layer[0] if per_layer else ():
            if config.scan_layers:
                params[(tower, "blocks", "blocks", *path)] = np.stack([p[path] for p in per_layer])
            else:
                for i, layer in enumerate(per_layer):
                    params[(tower, "blocks", "blocks", i, *path)] = layer[path]
    unused = sorted(n for n in set(tensors) - used if not n.endswith(IGNORED_TENSOR_SUFFIXES))
    if unused:
        raise CheckpointError(
            f"tensor {unused[0]!r} (shape {tuple(tensors[unused[0]].shape)}) has no place in "
            f"the model config.json describes ({len(unused)} unused tensors in all)"
        )
    return params


# ============================================================================================
# Public entry point
# ============================================================================================


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
    _check_directory(directory)
    try:
        with open(os.path.join(directory, CONFIG_FILE)) as f:
            raw = json.load(f)
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(
            f"{os.path.join(directory, CONFIG_FILE)} is not valid JSON ({error}); write it again "
            "with transformers' save_pretrained"
        ) from error
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

    abstract = nnx.eval_shape(lambda: CLIP(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    values = []
    for path, variable in flat:
        if path not in params:
            raise CheckpointError(f"no checkpoint tensor for parameter {'/'.join(map(str, path))}")
        expected = variable.get_value()
        value = params[path]
        if value.shape != expected.shape:  # a mapping bug, not a user error
            raise CheckpointError(
                f"parameter {'/'.join(map(str, path))}: converted shape {value.shape} "
                f"!= model shape {expected.shape}"
            )
        values.append((path, variable.replace(jnp.asarray(value, expected.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(values))
