"""Import transformers `UMT5EncoderModel` checkpoints (`config.json` + `model.safetensors`, or
its shards) into our `UMT5Encoder` (diffusion.models.umt5): the text encoder of Wan 2.1.

The directory is what `UMT5EncoderModel.save_pretrained` writes, as in the `text_encoder/`
folder of diffusers' Wan 2.1 repositories. config.json is checked: another model type (T5
shares one position-bias table; umT5 has one per block) or feed-forward is refused by name.
PyTorch Linear (out, in) matrices become our (in, ...) kernels; the attention projections are
split into (heads, head_dim). The token table is `shared.weight` (`encoder.embed_tokens.weight`
in some saves: the same tied tensor, read once). With a mesh the weights go straight from host
memory to their shards (fsdp over the width, tensor over heads, feed-forward and vocabulary).
"""

from __future__ import annotations

from flax import nnx
from jax.sharding import Mesh

from diffusion import sharding
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
from diffusion.models.umt5 import UMT5Config, UMT5Encoder

# config.json field -> UMT5Config field.
CONFIG_FIELDS = {
    "vocab_size": "vocab_size",
    "d_model": "width",
    "num_heads": "num_heads",
    "d_kv": "head_dim",
    "d_ff": "ffn_dim",
    "num_layers": "depth",
    "relative_attention_num_buckets": "num_buckets",
    "relative_attention_max_distance": "max_distance",
    "layer_norm_epsilon": "eps",
}
# transformers' feed_forward_proj -> (our activation, gated).
FEED_FORWARDS = {"gated-gelu": ("gelu_tanh", True)}
EXECUTION_FIELDS = ("dtype", "param_dtype")
TOKEN_TABLES = ("shared.weight", "encoder.embed_tokens.weight")  # one tied tensor, two names


def umt5_config_from_hf(raw: dict, **execution) -> UMT5Config:
    """Our UMT5Config from a UMT5 config.json dict; refuses what our encoder does not run."""
    if raw.get("model_type") != "umt5":
        raise CheckpointError(
            f"config.json describes a model_type {raw.get('model_type')!r}, not 'umt5' (a "
            "transformers UMT5EncoderModel; T5 and mT5 share one position bias across blocks, "
            "which this encoder does not implement)"
        )
    missing = [field for field in CONFIG_FIELDS if field not in raw]
    if missing:
        raise CheckpointError(f"config.json lacks the umT5 fields {missing}")
    feed_forward = raw.get("feed_forward_proj", "gated-gelu")
    if feed_forward not in FEED_FORWARDS:
        raise CheckpointError(
            f"config.json field 'feed_forward_proj' = {feed_forward!r} is not supported; "
            f"valid: {sorted(FEED_FORWARDS)} (umT5's)"
        )
    activation, gated = FEED_FORWARDS[feed_forward]
    try:
        return UMT5Config(
            **{ours: raw[theirs] for theirs, ours in CONFIG_FIELDS.items()},
            activation=activation,
            gated=gated,
            **execution,
        )
    except (TypeError, ValueError) as error:
        raise CheckpointError(
            f"config.json does not describe a valid umT5 encoder: {error}"
        ) from error


def _linear(path: tuple, name: str, out_features: int, in_features: int, shape: tuple) -> Entry:
    """A PyTorch Linear (out, in) -> our kernel of `shape` (in first)."""
    return (path, f"{name}.weight", (out_features, in_features), lambda w: w.T.reshape(shape))


def weight_entries(config: UMT5Config, tensors) -> list[Entry]:
    """One entry per tensor of a UMT5EncoderModel of `config`."""
    width, heads, head_dim, ffn = config.width, config.num_heads, config.head_dim, config.ffn_dim
    inner = heads * head_dim
    table = next((name for name in TOKEN_TABLES if name in tensors), TOKEN_TABLES[0])
    entries: list[Entry] = [
        (("embed", "embedding"), table, (config.vocab_size, width), lambda w: w)
    ]
    for i in range(config.depth):
        ours, theirs = ("blocks", i), f"encoder.block.{i}.layer"
        attention = f"{theirs}.0.SelfAttention"
        for name, torch_name in (("query", "q"), ("key", "k"), ("value", "v")):
            entries.append(
                _linear(
                    (*ours, "attention", name),
                    f"{attention}.{torch_name}",
                    inner,
                    width,
                    (width, heads, head_dim),
                )  # fmt: skip
            )
        entries += [
            _linear(
                (*ours, "attention", "out"),
                f"{attention}.o",
                width,
                inner,
                (heads, head_dim, width),
            ),  # fmt: skip
            (
                (*ours, "attention", "position_bias"),
                f"{attention}.relative_attention_bias.weight",
                (config.num_buckets, heads),
                lambda w: w,
            ),  # fmt: skip
            (
                (*ours, "attention_norm", "scale"),
                f"{theirs}.0.layer_norm.weight",
                (width,),
                lambda w: w,
            ),  # fmt: skip
            ((*ours, "ffn_norm", "scale"), f"{theirs}.1.layer_norm.weight", (width,), lambda w: w),
            _linear(
                (*ours, "ffn", "gate", "kernel"),
                f"{theirs}.1.DenseReluDense.wi_0",
                ffn,
                width,
                (width, ffn),
            ),  # fmt: skip
            _linear(
                (*ours, "ffn", "up", "kernel"),
                f"{theirs}.1.DenseReluDense.wi_1",
                ffn,
                width,
                (width, ffn),
            ),  # fmt: skip
            _linear(
                (*ours, "ffn", "down", "kernel"),
                f"{theirs}.1.DenseReluDense.wo",
                width,
                ffn,
                (ffn, width),
            ),  # fmt: skip
        ]
    entries.append((("final_norm", "scale"), "encoder.final_layer_norm.weight", (width,),
                    lambda w: w))  # fmt: skip
    return entries


def load_hf_umt5(
    directory: str,
    mesh: Mesh | None = None,
    rules: sharding.LogicalRules = sharding.DEFAULT_RULES,
    **execution,
) -> tuple[UMT5Encoder, UMT5Config]:
    """(encoder, config) from a transformers UMT5EncoderModel directory.

    mesh: place every weight on its shards as it is read (the 5.7B umt5-xxl need not fit one
    device); None: on the default device. `execution`: dtype, param_dtype.
    """
    if set(execution) - set(EXECUTION_FIELDS):
        raise UserError(
            f"unknown options {sorted(set(execution) - set(EXECUTION_FIELDS))}; "
            f"valid: {sorted(EXECUTION_FIELDS)}"
        )
    check_directory(directory, TRANSFORMERS)
    config = umt5_config_from_hf(read_config(directory, TRANSFORMERS), **execution)
    tensors = read_safetensors(directory)
    used: set[str] = set(TOKEN_TABLES[1:]) & set(tensors)  # the tied duplicate, if saved
    params = convert_entries(tensors, weight_entries(config, tensors), used)
    check_all_used(tensors, used)
    encoder = module_with_params(
        lambda: UMT5Encoder(config, rngs=nnx.Rngs(0)), params, mesh=mesh, rules=rules
    )
    return encoder, config
