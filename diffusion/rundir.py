"""A run directory: what train.py writes so that a run can be resumed, sampled or encoded.

    config.json    the resolved recipe (checkpoints.write_config)
    model.json     {"family", "config"}: the model's exact config
    tokenizer/     the Hugging Face tokenizer directory
    classes.json   a class-conditional model's class features and their value names
    checkpoints/   Orbax steps: train state and data-iterator position
    params/        the exported (EMA) weights, for sampling and as a DiT's text encoder

This module is the only one that knows these names. It reads and writes them for every layer
above (training, inference, evaluation, the pipeline runner).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import ml_collections
import tensorflow_datasets as tfds
from flax import nnx

from diffusion import checkpoints, hf, models, optim, param_export
from diffusion import data as data_lib
from diffusion.data import moving_shapes
from diffusion.data.latents import MEAN_KEY, LatentEncoding
from diffusion.errors import UserError
from diffusion.hf.files import DIFFUSERS, read_config
from diffusion.models.autoencoder import Autoencoder, AutoencoderConfig
from diffusion.train_step import TrainStep

logger = logging.getLogger(__name__)

MODEL_FILE = "model.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
CHECKPOINTS_DIR = "checkpoints"
CLASSES_FILE = "classes.json"
LATENTS_FILE = "latents.json"
CONFIG_FILE = checkpoints.CONFIG_FILENAME

# model.json's family -> (model class, config class).
MODEL_CLASSES = {
    "clip": (models.CLIP, models.CLIPConfig),
    "dit": (models.DiT, models.DiTConfig),
    "video_dit": (models.VideoDiT, models.VideoDiTConfig),
    "autoencoder": (Autoencoder, AutoencoderConfig),
}
# Model config fields that change how it runs, not its parameters: a run may resume with others.
EXECUTION_FIELDS = ("dtype", "remat_policy", "attention_impl")

REWRITE_HINT = (
    "It was edited or comes from another version: restore it from a copy, or delete it and "
    "rerun the train.py command of this run, which writes it again."
)


# ---------------------------------------------------------------------------------------------
# model.json
# ---------------------------------------------------------------------------------------------


def save_json(workdir: str, name: str, record) -> None:
    """WORKDIR/NAME as JSON, written by process 0 only (the run directory is shared), through a
    temporary renamed into place: a kill never leaves half a file."""
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, name)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
        os.replace(path + ".tmp", path)


def save_model_config(workdir: str, family: str, model_config) -> None:
    save_json(workdir, MODEL_FILE, {"family": family, "config": dataclasses.asdict(model_config)})


def load_model_config(run_dir: str) -> tuple[str, Any]:
    """(family, CLIPConfig, DiTConfig or AutoencoderConfig) of a run directory."""
    path = os.path.join(run_dir, MODEL_FILE)
    if not os.path.isfile(path):
        raise UserError(
            f"{run_dir!r} is not a run directory of this project: it has no {MODEL_FILE}. "
            "Pass the --workdir of a finished train.py run."
        )
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        family, fields = record["family"], dict(record["config"])
        if family not in MODEL_CLASSES:
            raise ValueError(f"family {family!r} is not one of {sorted(MODEL_CLASSES)}")
        for name in ("pixel_mean", "pixel_std"):
            if name in fields:
                fields[name] = tuple(fields[name])
        return family, MODEL_CLASSES[family][1](**fields)
    except (ValueError, KeyError, TypeError) as error:  # JSONDecodeError is a ValueError
        what = f"missing key {error}" if isinstance(error, KeyError) else str(error)
        raise UserError(
            f"{path} does not describe a model of this project ({type(error).__name__}: {what}); "
            "it was edited or comes from another version. Restore it from a copy, or delete it "
            "and rerun the train.py command of this run, which writes it again."
        ) from error


def check_resumable(workdir: str, family: str, model_config) -> None:
    """Refuses, before anything is written, a config whose model differs from the one of the
    checkpoints in `workdir` (it would fail deep inside the restore, or mix two models)."""
    if latest_step(workdir) is None or not os.path.isfile(os.path.join(workdir, MODEL_FILE)):
        return
    saved_family, saved = load_model_config(workdir)
    old, new = dataclasses.asdict(saved), dataclasses.asdict(model_config)
    changed = [
        f"{name}: {old.get(name)!r} -> {value!r}"
        for name, value in new.items()
        if name not in EXECUTION_FIELDS and old.get(name) != value
    ]
    if saved_family != family:
        changed.insert(0, f"family: {saved_family!r} -> {family!r}")
    if changed:
        raise UserError(
            f"{workdir!r} holds checkpoints of another model than this config makes "
            f"({'; '.join(changed)}), so it cannot resume them; they are left untouched. Pass a "
            "new --workdir for this model, or rerun with the config the run started with "
            f"(saved in {os.path.join(workdir, CONFIG_FILE)})."
        )


# ---------------------------------------------------------------------------------------------
# Weights: exported params/, checkpoints, text encoders
# ---------------------------------------------------------------------------------------------


def latest_step(run_dir: str) -> int | None:
    """The newest checkpoint step directory of a run (complete or not), or None."""
    directory = os.path.join(run_dir, CHECKPOINTS_DIR)
    steps = (
        [int(n) for n in os.listdir(directory) if n.isdigit()] if os.path.isdir(directory) else []
    )
    return max(steps) if steps else None


def load_run_params(run_dir: str, model_config, model_cls) -> nnx.Module:
    """The exported (EMA) parameters of a run as a model on the default device."""
    abstract = nnx.eval_shape(lambda: model_cls(model_config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    path = os.path.join(run_dir, PARAMS_DIR)
    if not os.path.isdir(path):
        raise UserError(
            f"{run_dir!r} has no exported parameters ({PARAMS_DIR}/): its training has not "
            "finished. Rerun train.py with that --workdir to finish it."
        )
    # Onto this process's first device, whatever mesh the run was trained on.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)
    return nnx.merge(graphdef, param_export.load_params(path, target))


def load_checkpoint_params(run_dir: str, config, model_config, model_cls, mesh, step, use_ema):
    """(params as nnx.State, step) from the run's Orbax checkpoint `step`. With step None, the
    newest checkpoint that restores: an unreadable one (a truncated file) is reported and the one
    before it is used, as train.py resumes."""
    directory = os.path.join(run_dir, CHECKPOINTS_DIR)
    manager = checkpoints.make_checkpoint_manager(directory, max_to_keep=None, async_save=False)
    try:
        complete = sorted(manager.all_steps())
        if step is not None and step not in complete or not complete:
            raise UserError(
                f"{directory!r} has no complete checkpoint {step if step is not None else ''}; "
                f"complete steps: {complete}"
            )
        # The train step's own abstract state: the restore target with every leaf's shape.
        tx = optim.make_optimizer(config.optimizer, total_steps=config.training.num_steps)
        abstract = TrainStep(
            lambda: model_cls(model_config, rngs=nnx.Rngs(0)),
            None,
            tx,
            mesh,
            seed=config.seed,
            ema_decay=config.training.ema_decay,
        ).abstract_state
        candidates = [step] if step is not None else complete[::-1]
        for candidate in candidates:
            try:
                state = checkpoints.restore_checkpoint(
                    manager, abstract, candidate, restore_data_iterator=False
                ).train_state
                step = candidate
                break
            except Exception as error:  # noqa: BLE001 - Orbax raises many kinds; the user needs one
                path = checkpoints.step_path(manager, candidate)
                cause = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                if candidate == candidates[-1]:
                    others = [s for s in complete if s != candidate]
                    hint = (
                        f"pass another of its steps {others} as {directory}/STEP"
                        if step is not None and others
                        else "the run has no readable checkpoint; train it again"
                    )
                    raise UserError(
                        f"checkpoint {path!r} could not be restored ({cause}); {hint}"
                    ) from error
                logger.warning(
                    "checkpoint %s could not be restored (%s); trying the one before", path, cause
                )
    finally:
        manager.close()
    if use_ema and state["ema"] is None:
        logger.warning("run %s was trained without EMA; sampling its raw parameters", run_dir)
    params = state["ema"] if use_ema and state["ema"] is not None else state["params"]
    return params, int(step)


def check_text_encoder_directory(checkpoint: str) -> None:
    if not checkpoint or not os.path.isdir(checkpoint):
        raise UserError(
            f"config.text_encoder.checkpoint={checkpoint!r} is not a directory. Name a CLIP run "
            "directory of train.py or a Hugging Face CLIP directory (config.json + "
            "model.safetensors)."
        )


def load_text_encoder(checkpoint: str, execution: dict) -> models.CLIP:
    """A frozen CLIP: our run directory (model.json + params/) or a Hugging Face CLIP directory."""
    check_text_encoder_directory(checkpoint)
    if os.path.isfile(os.path.join(checkpoint, MODEL_FILE)):
        family, config = load_model_config(checkpoint)
        if family != "clip":
            raise UserError(
                f"{checkpoint!r} holds a {family} model; the text encoder must be CLIP."
            )
        return load_run_params(checkpoint, config, models.CLIP)
    return hf.load_hf_clip(checkpoint, **execution)


HF_TOKENIZER_FILE = "tokenizer_config.json"  # what save_pretrained of a tokenizer writes


def text_encoder_context_length(checkpoint: str) -> int:
    """Tokens a caption may have for the CLIP `load_text_encoder` loads from `checkpoint`: a run's
    config.tokenizer.context_length, a Hugging Face directory's position table."""
    check_text_encoder_directory(checkpoint)
    if not os.path.isfile(os.path.join(checkpoint, MODEL_FILE)):
        return hf.text_context_length(checkpoint)
    return int(load_run_config(checkpoint).tokenizer.context_length)


def text_encoder_tokenizer(checkpoint: str) -> tuple[str, int]:
    """(tokenizer directory, context length) that the CLIP `load_text_encoder` loads from
    `checkpoint` was trained with: a run's own tokenizer/ (else the one its recipe names); a
    Hugging Face directory's own tokenizer files."""
    context = text_encoder_context_length(checkpoint)
    if not os.path.isfile(os.path.join(checkpoint, MODEL_FILE)):
        if not os.path.isfile(os.path.join(checkpoint, HF_TOKENIZER_FILE)):
            raise UserError(
                f"the Hugging Face CLIP directory {checkpoint!r} has no tokenizer files "
                f"({HF_TOKENIZER_FILE}); pass --config.tokenizer.path= the tokenizer its text "
                "tower was trained with (a directory or a Hugging Face name)"
            )
        return checkpoint, context
    own = tokenizer_dir(checkpoint)
    tokenizer = own if os.path.isdir(own) else load_run_config(checkpoint).tokenizer.path
    if not tokenizer:
        raise UserError(f"CLIP run directory {checkpoint!r} has no {TOKENIZER_DIR}/ directory")
    return tokenizer, context


AUTOENCODER_HINT = (
    "Pass an autoencoder run directory of train.py (--config=configs/base_autoencoder.py) or a "
    'diffusers AutoencoderKL directory (config.json with "_class_name": "AutoencoderKL" '
    "and diffusion_pytorch_model.safetensors, as AutoencoderKL.save_pretrained writes them)."
)
AUTOENCODER_EXECUTION_FIELDS = ("dtype", "attention_impl")


def is_diffusers_directory(path: str) -> bool:
    """A directory with a diffusers config.json and no model.json (an imported model)."""
    return (
        os.path.isdir(path)
        and not os.path.isfile(os.path.join(path, MODEL_FILE))
        and os.path.isfile(os.path.join(path, hf.CONFIG_FILE))
    )


def load_autoencoder(path: str, **execution) -> tuple[Autoencoder, AutoencoderConfig]:
    """(model, config) of a KL autoencoder: the exported (EMA) weights of an autoencoder run
    directory of ours (model.json + params/), or a diffusers AutoencoderKL directory.

    execution: how it runs, not its weights (dtype, attention_impl).
    """
    unknown = sorted(set(execution) - set(AUTOENCODER_EXECUTION_FIELDS))
    if unknown:
        raise UserError(
            f"load_autoencoder: unknown options {unknown}; valid: {AUTOENCODER_EXECUTION_FIELDS}"
        )
    if not os.path.isdir(path):
        raise UserError(f"autoencoder {path!r} is not a directory. {AUTOENCODER_HINT}")
    if os.path.isfile(os.path.join(path, MODEL_FILE)):
        family, config = load_model_config(path)
        if family != "autoencoder":
            raise UserError(
                f"{path!r} is a run directory of a {family} model, not of an autoencoder. "
                f"{AUTOENCODER_HINT}"
            )
        try:
            config = dataclasses.replace(config, **execution)
        except ValueError as error:
            raise UserError(f"load_autoencoder({path!r}): {error}") from error
        return load_run_params(path, config, Autoencoder), config
    config_path = os.path.join(path, hf.CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise UserError(
            f"{path!r} is neither a run directory (it has no {MODEL_FILE}) nor a diffusers "
            f"directory (it has no {hf.CONFIG_FILE}). {AUTOENCODER_HINT}"
        )
    class_name = read_config(path, DIFFUSERS).get("_class_name")
    if class_name != "AutoencoderKL":
        raise UserError(
            f"{config_path} describes a {class_name or 'model without a _class_name'}, not an "
            f"AutoencoderKL. {AUTOENCODER_HINT}"
        )
    return hf.load_diffusers_autoencoder(path, **execution)


def save_classes(workdir: str, classes: data_lib.ClassSpace) -> None:
    """classes.json: what class ids and names mean to a class-conditional model."""
    save_json(workdir, CLASSES_FILE, classes.to_json())


def load_classes(run_dir: str) -> data_lib.ClassSpace:
    """The ClassSpace a class-conditional run was trained on (its classes.json)."""
    path = os.path.join(run_dir, CLASSES_FILE)
    if not os.path.isfile(path):
        raise UserError(
            f"{run_dir!r} has no {CLASSES_FILE}, which names a class-conditional run's classes. "
            "Rerun the train.py command of this run, which writes it again."
        )
    try:
        with open(path, encoding="utf-8") as f:
            return data_lib.ClassSpace.from_json(json.load(f))
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path} does not name classes ({error}). {REWRITE_HINT}") from error


def save_latents(workdir: str, encoding: LatentEncoding) -> None:
    """latents.json: the autoencoder and normalisation of a model trained on latents, so that
    sampling decodes what it draws."""
    save_json(workdir, LATENTS_FILE, encoding.to_json())


def load_latents(run_dir: str) -> LatentEncoding | None:
    """The latent encoding a run was trained on (its latents.json); None for a pixel model."""
    path = os.path.join(run_dir, LATENTS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return LatentEncoding.from_json(json.load(f))
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path} does not describe latents ({error}). {REWRITE_HINT}") from error


def tokenizer_dir(run_dir: str) -> str:
    return os.path.join(run_dir, TOKENIZER_DIR)


def load_tokenizer(run_dir: str, config):
    """The run's own tokenizer/ directory, else the one its recipe names."""
    own = os.path.join(run_dir, TOKENIZER_DIR)
    if os.path.isdir(own):
        return data_lib.load_tokenizer(own)
    if config.tokenizer.path:
        return data_lib.load_tokenizer(config.tokenizer.path)
    raise UserError(f"run directory {run_dir!r} has no {TOKENIZER_DIR}/ directory")


# ---------------------------------------------------------------------------------------------
# Locating a run and reading its config.json
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunLocation:
    """Where a --checkpoint points: the run directory, and the checkpoint step if one was named."""

    run_dir: str
    step: int | None  # None: the run's exported params/


def locate_run(path: str, what: str = "run") -> RunLocation:
    """A run directory or one of its `checkpoints/<step>` directories -> RunLocation.

    what: the kind of run the caller needs, as its errors name it (e.g. "DiT run").
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise UserError(
            f"checkpoint {path!r} does not exist; pass a {what} directory (train.py --workdir) "
            f"or one of its {CHECKPOINTS_DIR}/<step> directories"
        )
    if os.path.isfile(os.path.join(path, MODEL_FILE)):
        return RunLocation(path, None)
    parent = os.path.dirname(path)
    name = os.path.basename(path)
    run_dir = os.path.dirname(parent)
    if (
        name.isdigit()
        and os.path.basename(parent) == CHECKPOINTS_DIR
        and os.path.isfile(os.path.join(run_dir, MODEL_FILE))
    ):
        return RunLocation(run_dir, int(name))
    raise UserError(
        f"{path!r} is neither a run directory (it has no {MODEL_FILE}) nor a "
        f"{CHECKPOINTS_DIR}/<step> directory inside one; pass the --workdir of a train.py {what}"
    )


# The fields of a run's config.json that sampling and evaluation read, by family.
RUN_CONFIG_KEYS = (
    "family",
    "seed",
    "data.name",
    "data.builder_config",
    "data.data_dir",
    "data.image_key",
    "data.caption_key",
    "data.label_key",
    "data.caption_template",
    "data.num_train_examples",
    "data.num_eval_examples",
    "model.dtype",
)
TEXT_RUN_CONFIG_KEYS = ("tokenizer.path", "tokenizer.context_length")  # not the autoencoder's
DIT_RUN_CONFIG_KEYS = (
    "text_encoder.checkpoint",
    "diffusion.objective",
    "diffusion.prediction_type",
    "optimizer",
    "training.num_steps",
    "training.ema_decay",
)


def _has_key(record: dict, key: str) -> bool:
    node = record
    for name in key.split("."):
        if not isinstance(node, dict) or name not in node:
            return False
        node = node[name]
    return True


def load_run_config(run_dir: str) -> ml_collections.ConfigDict:
    """A run directory's config.json, checked to hold every field sampling and evaluation read."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise UserError(f"run directory {run_dir!r} has no {CONFIG_FILE}")
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(
            f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})."
            f" {REWRITE_HINT}"
        ) from error
    if not isinstance(record, dict):
        raise UserError(
            f"{path} holds a {type(record).__name__}, not a JSON object. {REWRITE_HINT}"
        )
    keys = RUN_CONFIG_KEYS + (DIT_RUN_CONFIG_KEYS if record.get("family") == "dit" else ())
    keys += TEXT_RUN_CONFIG_KEYS if record.get("family") != "autoencoder" else ()
    missing = [key for key in keys if not _has_key(record, key)]
    if missing:
        raise UserError(f"{path} lacks the fields {', '.join(missing)}. {REWRITE_HINT}")
    return ml_collections.ConfigDict(record)


def builder_resolution(data_config) -> int | None:
    """The image side an embedded builder config names (shapes "32" -> 32, moving_shapes
    "32_8" -> 32), else None (read the data)."""
    name = data_config.builder_config
    if name and str(name).isdigit():
        return int(name)
    if data_config.name == "moving_shapes" and name:
        return moving_shapes.config_from_name(str(name)).resolution
    return None


def run_frames(config) -> int:
    """Frames per clip of a run's dataset of clips (its input feature is (T, H, W, C)), 0 for a
    dataset of images: from a moving_shapes builder config ("32_8" -> 8), else the prepared
    dataset (its latent clips (T, h, w, c) for an encode.py dataset)."""
    data_config = config.data
    if data_config.name == "moving_shapes" and data_config.builder_config:
        return moving_shapes.config_from_name(str(data_config.builder_config)).frames
    if builder_resolution(data_config):  # shapes: images
        return 0
    try:
        name = data_config.name
        if data_config.builder_config:
            name = f"{name}/{data_config.builder_config}"
        builder = tfds.builder(name, data_dir=data_config.data_dir)
        features = builder.info.features
        key = MEAN_KEY if MEAN_KEY in features else data_config.image_key
        shape = features[key].shape
    except Exception as error:  # noqa: BLE001 - any failure means "ask the user"
        raise UserError(
            f"cannot tell whether the run's dataset ({data_config.name}) holds clips or images "
            f"({error}); prepare it where config.data.data_dir says"
        ) from error
    return int(shape[0]) if len(shape) == 4 else 0


def run_resolution(config) -> int:
    """The image side of a run's dataset: from its builder config, else the prepared dataset."""
    found = builder_resolution(config.data)
    if found:
        return found
    try:  # a prepared TFDS dataset knows its image shape
        name = config.data.name
        if config.data.builder_config:
            name = f"{name}/{config.data.builder_config}"
        builder = tfds.builder(name, data_dir=config.data.data_dir)
        return int(builder.info.features[config.data.image_key].shape[-3])  # ([T,] H, W, C)
    except Exception as error:  # noqa: BLE001 - any failure means "ask the user"
        raise UserError(
            f"cannot tell the image resolution of this run ({config.data.name}: {error}); pass "
            "resolution= to TextToImage.from_run"
        ) from error
