"""The video DiT family: a recipe -> VideoDiTConfig, flow matching on clips conditioned on a
frozen CLIP text tower's token states, with caption dropout for guidance, and the batch its
train step reads.

The objective and the text conditioning are the DiT family's (`dit.DiffusionObjective`,
`dit.drop_captions`, `dit.text_condition`): the objectives are rank-generic, so a clip
(B, T, H, W, C) is noised and scored as an image is. The video DiT reads the caption's token
states and mask only (Wan 2.1 has no pooled text input). A dataset of images trains the same
model on one-frame clips (B, 1, H, W, C), so images and clips can share one model.

Fine-tuning: `config.model.weights` starts training from pretrained weights (a video_dit run
directory of ours, or a diffusers WanTransformer3DModel directory), whose config then decides
the architecture; `config.lora.rank` > 0 adds low-rank adapters (diffusion/models/lora.py) and
trains them alone, the base frozen, and a finished run writes them as LORA_FILE in diffusers'
format (diffusion/hf/wan_lora.py).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from diffusion import hf, models, rundir, sharding
from diffusion.errors import UserError
from diffusion.families import dit
from diffusion.families.base import DataFacts, ModelBuild, abstract_array, model_config_error
from diffusion.hf import files as hf_files
from diffusion.hf import wan_lora, wan_transformer
from diffusion.models import lora

NAME = "video_dit"
TAKES_CLIPS = True  # and images, as one-frame clips
LORA_FILE = "lora.safetensors"  # a LoRA fine-tune's adapters, in its run directory


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------


def clips_of(batch) -> jax.Array:
    """The batch's clips (B, T, H, W, C); a batch of images as one-frame clips (B, 1, H, W, C)."""
    if "video" in batch:
        return batch["video"]
    return batch["image"][:, None]


def video_model_fn(model):
    """`model_fn(x_t, t, cond)` of the diffusion core, over a text-conditioned video DiT."""

    def model_fn(x, t, cond):
        return model(
            x,
            t,
            context=cond["context"],
            context_mask=cond["context_mask"],
            words=cond.get("words"),  # the model names a missing or unexpected one
        )

    return model_fn


def text_conditional_loss(
    model,
    text_encoder,
    batch,
    key,
    *,
    objective: dit.DiffusionObjective,
    empty_tokens: np.ndarray,
    empty_mask: np.ndarray,
    cond_dropout: float,
):
    """The denoising loss of the clips given their captions' token states; a caption becomes the
    empty prompt with probability `cond_dropout` (classifier-free guidance, Ho & Salimans).
    The same keys as the DiT's loss: a one-frame clip is scored as the DiT scores an image."""
    drop_key, loss_key = jax.random.split(key)
    tokens, mask = dit.drop_captions(
        batch["tokens"], batch["mask"], drop_key, cond_dropout, empty_tokens, empty_mask
    )
    words = model.config.word_conditioning
    cond = dit.text_condition(text_encoder, tokens, mask, words=words)  # pooled goes unread
    loss, aux = objective.loss(video_model_fn(model), clips_of(batch), cond, loss_key)
    return loss, {"mean_t": jnp.mean(aux["t"])}


# ---------------------------------------------------------------------------------------------
# The recipe's model and loss
# ---------------------------------------------------------------------------------------------


def is_text_conditional(config) -> bool:
    """Always: the video DiT is conditioned on text (the training loop asks every DiT family)."""
    del config
    return True


def check_patch_fits(patch_size, data: DataFacts, dataset: str) -> None:
    """The patch's frames must divide the clips' (one for images) and its sides the frame's."""
    pt, ph, pw = patch_size
    frames = data.frames or 1
    side = data.image_size
    if frames % pt or side % ph or side % pw:
        what = f"clips of {frames} frames" if data.frames else "images (one-frame clips)"
        raise UserError(
            f"config.model.patch_size={tuple(patch_size)} (frames, rows, columns) does not tile "
            f"the {what} of {side}x{side} of {dataset!r}; pass a patch whose sizes divide "
            f"({frames}, {side}, {side}), e.g. --config.model.patch_size='(1, 4, 4)'."
        )


def model_config(
    config, data: DataFacts, text_config: models.CLIPConfig, **overrides
) -> models.VideoDiTConfig:
    """The video DiT of a recipe: its variant and the fields config.model sets, on the data's
    channels, reading the token states of the text tower of `text_config`."""
    m = config.model
    fields = dict(
        in_channels=data.image_channels,
        out_channels=data.image_channels,
        text_dim=text_config.text_width,
        **models.recipe_fields(config, NAME),
    )
    if "patch_size" in fields:
        fields["patch_size"] = tuple(int(p) for p in fields["patch_size"])
    try:
        model_config_ = models.video_dit_config(m.variant, **{**fields, **overrides})
    except (ValueError, UserError) as error:
        raise model_config_error(error, m) from error
    check_patch_fits(model_config_.patch_size, data, config.data.name)
    return model_config_


# ---------------------------------------------------------------------------------------------
# Fine-tuning: pretrained weights and low-rank adapters
# ---------------------------------------------------------------------------------------------


def lora_fields(config) -> dict:
    """The VideoDiTConfig fields of config.lora ({} when absent or rank 0)."""
    section = config.get("lora")
    if section is None or not section.rank:
        return {}
    fields = dict(lora_rank=section.rank, lora_alpha=section.alpha)
    if section.get("targets") is not None:
        fields["lora_targets"] = tuple(section.targets)
    return fields


def _flat_params(model) -> dict[tuple, np.ndarray]:
    return {
        path: np.asarray(variable.get_value())
        for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def _unstack_blocks(params: dict[tuple, np.ndarray]) -> dict[tuple, np.ndarray]:
    """wan_transformer.stack_blocks undone: ("blocks", "blocks", *rest) holding a leading
    'layers' axis -> one path ("blocks", "blocks", i, *rest) per block."""
    out = {}
    for path, value in params.items():
        if path[:2] == ("blocks", "blocks"):
            out.update({(*path[:2], i, *path[2:]): layer for i, layer in enumerate(value)})
        else:
            out[path] = value
    return out


def _relayout(params, saved_scanned: bool, config: models.VideoDiTConfig):
    if saved_scanned == config.scan_layers:
        return params
    if config.scan_layers:
        return wan_transformer.stack_blocks(params, config.depth)
    return _unstack_blocks(params)


def pretrained(weights: str, execution: dict):
    """(the VideoDiTConfig of the pretrained model at `weights`, with our execution fields;
    () -> {parameter path: host array} of its weights). A run of ours that was itself a LoRA
    fine-tune gives its weights with the adapters merged."""
    if rundir.is_diffusers_directory(weights):
        layout = wan_transformer.WAN_DIFFUSERS
        hf_files.check_directory(weights, layout)
        raw = hf_files.read_config(weights, layout)
        base = wan_transformer.video_dit_config_from_diffusers(raw, **execution)

        def load():
            tensors = hf.read_safetensors(weights, layout.weights_file, layout.index_file)
            return wan_transformer.convert_weights(tensors, base)

        return base, load
    if not os.path.isfile(os.path.join(weights, rundir.MODEL_FILE)):
        raise UserError(
            f"config.model.weights={weights!r} is neither a video_dit run directory of this "
            f"project ({rundir.MODEL_FILE} + {rundir.PARAMS_DIR}/) nor a diffusers "
            f"WanTransformer3DModel directory ({hf.CONFIG_FILE} + "
            f"{wan_transformer.WAN_DIFFUSERS.weights_file}); pass one of them."
        )
    family, saved = rundir.load_model_config(weights)
    if family != NAME:
        raise UserError(
            f"config.model.weights={weights!r} is a {family!r} run; a video DiT fine-tune starts "
            f"from a {NAME!r} run or a diffusers WanTransformer3DModel directory."
        )
    base = dataclasses.replace(saved, lora_rank=0, **execution)

    def load():
        model = rundir.load_run_params(weights, saved, models.VideoDiT)
        if saved.lora_rank:
            model = lora.merge_lora(model)
        return _relayout(_flat_params(model), saved.scan_layers, base)

    return base, load


def _check_weights_fit(config, base, data: DataFacts, text_config) -> None:
    """The recipe's size fields, the data and the text tower must agree with the weights."""
    m = config.model
    fields = models.recipe_fields(config, NAME)
    differing = [
        f"{name}={fields[name]!r} (weights: {getattr(base, name)!r})"
        for name in ("width", "depth", "num_heads", "ffn_dim", "word_conditioning", "input_stem")
        if name in fields and fields[name] != getattr(base, name)
    ]
    if "patch_size" in fields and tuple(fields["patch_size"]) != base.patch_size:
        differing.append(f"patch_size={tuple(fields['patch_size'])} (weights: {base.patch_size})")
    if differing:
        raise UserError(
            f"config.model sets {', '.join(differing)}, but config.model.weights={m.weights!r} "
            "decides the architecture; unset those fields (e.g. --config.model.width=None) or "
            "set them to the weights' values."
        )
    if base.in_channels != data.image_channels:
        raise UserError(
            f"config.model.weights={m.weights!r} takes {base.in_channels} input channels, the "
            f"data {config.data.name!r} has {data.image_channels}; fine-tune on data of the "
            "weights' channels (a latent dataset of the same autoencoder)."
        )
    if text_config.text_width != base.text_dim:
        raise UserError(
            f"config.model.weights={m.weights!r} reads text states of width {base.text_dim}, "
            f"the text encoder config.text_encoder.checkpoint gives {text_config.text_width}; "
            "use the text encoder the weights were trained with."
        )


def fine_tune_config(config, data: DataFacts, text_config, **overrides):
    """(the model config of a recipe, with its LoRA fields; the pretrained weights' loader or
    None)."""
    weights = config.model.get("weights")
    if weights is None:
        if lora_fields(config):
            raise UserError(
                f"config.lora.rank={config.lora.rank} adapts pretrained weights, but "
                "config.model.weights is unset; pass --config.model.weights=DIR (a video_dit run "
                "directory or a diffusers WanTransformer3DModel directory), or "
                "--config.lora.rank=0 to train the whole model."
            )
        return model_config(config, data, text_config, **overrides), None
    execution = {
        k: v for k, v in models.recipe_fields(config, NAME).items()
        if k in wan_transformer.EXECUTION_FIELDS
    }  # fmt: skip
    base, load = pretrained(weights, execution)
    _check_weights_fit(config, base, data, text_config)
    try:
        model_config_ = dataclasses.replace(base, **lora_fields(config), **overrides)
    except UserError as error:
        fields = ", ".join(f"{k}={v!r}" for k, v in config.lora.items())
        raise UserError(
            f"config.lora ({fields}) does not make adapters: {error}. Fix it with "
            "--config.lora.FIELD=VALUE."
        ) from error
    check_patch_fits(model_config_.patch_size, data, config.data.name)
    return model_config_, load


def save_adapters(model, workdir: str) -> None:
    """A finished LoRA fine-tune's adapters as WORKDIR/LORA_FILE (diffusers' Wan LoRA format)."""
    wan_lora.save_lora_safetensors(model, os.path.join(workdir, LORA_FILE))


def build(
    config, data: DataFacts, mesh: Mesh, text_config: models.CLIPConfig, **model_overrides
) -> ModelBuild:
    """The recipe's video DiT and its denoising loss on the frozen text tower of `text_config`."""
    del mesh  # the loss is per example: no collective of its own
    if text_config is None:
        raise ValueError("the video DiT is text-conditional: it needs text_config")
    if config.diffusion.objective != "flow":
        raise UserError(
            f"config.diffusion.objective={config.diffusion.objective!r}: the video DiT trains by "
            "flow matching, as Wan 2.1 does; pass --config.diffusion.objective=flow."
        )
    objective = dit.DiffusionObjective.from_config(config.diffusion)
    loss_fn = functools.partial(  # loss_fn(model, frozen, batch, key), as the train step calls it
        text_conditional_loss,
        objective=objective,
        empty_tokens=data.empty_tokens,
        empty_mask=data.empty_mask,
        cond_dropout=float(config.diffusion.cond_dropout),
    )
    model_config_, base_params = fine_tune_config(config, data, text_config, **model_overrides)
    adapted = model_config_.lora_rank > 0
    return ModelBuild(
        NAME,
        model_config_,
        models.VideoDiT,
        loss_fn,
        config.seed,
        frozen_config=text_config,
        frozen_class=models.CLIP,
        base_params=base_params,
        trainable=lora.is_adapter_path if adapted else None,
        export=save_adapters if adapted else None,
    )


def abstract_batch(config, mesh: Mesh, build_: ModelBuild, data: DataFacts) -> dict:
    """The global batch the train step reads, as ShapeDtypeStructs sharded over the batch axes."""
    rows = sharding.batch_sharding(mesh)
    batch = int(config.training.global_batch_size)
    side, channels = data.image_size, build_.model_config.in_channels
    if data.frames:
        out = {
            "video": abstract_array((batch, data.frames, side, side, channels), jnp.float32, rows)
        }
    else:
        out = {"image": abstract_array((batch, side, side, channels), jnp.float32, rows)}
    out["tokens"] = abstract_array((batch, data.context_length), jnp.int32, rows)
    out["mask"] = abstract_array((batch, data.context_length), jnp.int32, rows)
    return out


def input_options(config) -> dict:
    """The input pipeline's options: clips (or images) and captions; no class ids."""
    if config.data.get("class_features"):
        raise UserError(
            f"config.data.class_features={tuple(config.data.class_features)} is set, but the "
            "video DiT is conditioned on captions only; pass --config.data.class_features='()'."
        )
    return {}
