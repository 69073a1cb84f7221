"""evaluate.py's library: `evaluate_checkpoint(run_dir, output_dir, options)` measures a CLIP run
(zero-shot attributes or classes, retrieval) or a DiT run (samples of every held-out caption over
a guidance and sampler sweep, read back by the shapes oracle, CLIP score, Frechet distance, the
negative-prompt check) and writes metrics.json, TensorBoard scalars and an HTML report.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from diffusion import metrics as metrics_lib
from diffusion import rundir
from diffusion.contrastive import retrieval_metrics
from diffusion.data import shapes as shapes_lib
from diffusion.errors import UserError
from diffusion.evaluation import report, sweep
from diffusion.evaluation.autoencoder_features import (
    AutoencoderFeatures,
    feature_autoencoder_path,
)
from diffusion.evaluation.checks import diversity_check, negative_check_scale, negative_prompt_check
from diffusion.evaluation.class_conditional import evaluate_class_dit_run
from diffusion.evaluation.clip_metrics import (
    ClipEncoder,
    clip_score,
    frechet_distance_of_features,
    label_class_prompts,
    zero_shot_accuracy,
    zero_shot_top_k_accuracy,
)
from diffusion.evaluation.fidelity import (
    open_attribute_metrics,
)
from diffusion.evaluation.held_out import load_split_examples
from diffusion.evaluation.reconstruction import evaluate_autoencoder_run
from diffusion.evaluation.shapes_oracle import (
    ATTRIBUTES,
    PROMPTED_ATTRIBUTES,
    attribute_accuracy,
    misreads,
    read_attributes,
)
from diffusion.evaluation.video_evaluation import evaluate_video_dit_run
from diffusion.inference import SAMPLERS_BY_OBJECTIVE, TextToImage


@dataclasses.dataclass(frozen=True)
class EvaluationOptions:
    """What evaluate.py measures; the defaults are the flags' defaults."""

    num_samples: int = 512  # examples (captions) per split
    splits: tuple[str, ...] = ("test", "test_unseen")
    guidance_scales: tuple[float, ...] = (1.0, 2.0, 4.0, 6.0)
    samplers: tuple[tuple[str, int], ...] = ()  # (name, steps); () = euler:20 or ddim:20 (ddpm)
    clip_checkpoint: str | None = None  # None: the DiT's own text encoder run
    batch_size: int = 64  # samples per sampling program / embedding call
    grid_size: int = 16  # samples shown per grid in the report
    negative_prompt: str = "a large circle in the center"  # the negative-prompt check ...
    negative_color: str = "red"  # ... with this color as the negative prompt ("" skips it)
    data_dir: str | None = None  # overrides the run's config.data.data_dir
    source_data_dir: str | None = None  # a latent run: where its encoded images are now
    resolution: int | None = None  # autoencoder: shapes side to reconstruct (None: the run's)
    diversity_captions: int = 8  # DiT: captions per split sampled many times at its best (0: none)
    diversity_samples: int = 8  # DiT: samples (seeds) of each of those captions
    feature_autoencoder: str | None = None  # DiT: autoencoder for the FD (None: a latent run's)
    where: str | None = None  # overrides the run's config.data.where ("": every record)
    # Sampler options of every setting of the sweep and of its checks (sample.py's flags).
    eta: float = 0.0  # DDIM / stochastic-Euler noise
    shift: float | None = None  # flow time shift of the sampling grid (None: training's)
    guidance_rescale: float = 0.0  # phi of Lin et al. 2023
    guidance_interval: tuple[float, float] | None = None  # guidance only for t in it

    @property
    def sampler_options(self) -> dict:
        """The keyword options a pipeline's `settings` and `generate` take besides the sampler
        and its steps."""
        return {
            "eta": self.eta,
            "shift": self.shift,
            "guidance_rescale": self.guidance_rescale,
            "guidance_interval": self.guidance_interval,
        }


# The options a CLIP and an autoencoder evaluation read; a DiT's reads them all. metrics.json
# records only these, so that a pipeline whose DiT sampler changed keeps its CLIP metrics.
_EXAMPLES_OPTIONS = ("num_samples", "splits", "batch_size", "data_dir", "where")
OPTIONS_READ_BY_FAMILY = {
    "clip": _EXAMPLES_OPTIONS,
    "autoencoder": (*_EXAMPLES_OPTIONS, "grid_size", "resolution"),
}


def options_record(options: EvaluationOptions, family: str | None = None) -> dict:
    """The options a `family` evaluation reads, as metrics.json records them (JSON types, tuples
    as lists), so that a pipeline's rerun evaluates again when they changed."""
    record = json.loads(json.dumps(dataclasses.asdict(options)))
    read = OPTIONS_READ_BY_FAMILY.get(family)
    return record if read is None else {name: record[name] for name in read}


def parse_guidance_scales(text: str) -> tuple[float, ...]:
    """ "1,2,4.5" -> (1.0, 2.0, 4.5); every scale a finite number >= 0."""
    scales = []
    for item in (text or "").split(","):
        try:
            value = float(item)
        except ValueError:
            value = float("nan")
        if not np.isfinite(value) or value < 0:
            raise UserError(
                f"--guidance_scales={text!r}: {item.strip()!r} is not a finite number >= 0; give "
                "comma-separated scales such as 1,2,4,6"
            )
        scales.append(value)
    return tuple(dict.fromkeys(scales))


def parse_samplers(text: str) -> tuple[tuple[str, int], ...]:
    """ "euler:20,ddim:50" -> (("euler", 20), ("ddim", 50)); "" -> () (the objective's default)."""
    known = sorted({name for names in SAMPLERS_BY_OBJECTIVE.values() for name in names})
    result = []
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        name, _, steps = item.partition(":")
        if name not in known:
            raise UserError(
                f"--samplers={text!r}: unknown sampler {name!r}; valid: {', '.join(known)} "
                "(each as NAME:STEPS, e.g. euler:20)"
            )
        if not steps.isdigit() or int(steps) < 1:
            raise UserError(
                f"--samplers={text!r}: {item!r} needs a step count >= 1 after the colon, "
                "e.g. euler:20"
            )
        result.append((name, int(steps)))
    return tuple(dict.fromkeys(result))


# ---------------------------------------------------------------------------------------------
# The two families
# ---------------------------------------------------------------------------------------------


def with_where(config, options: EvaluationOptions):
    """The run's config with options.where (evaluate.py --where) as its record filter; every
    family reads its held-out examples from config.data. None keeps the run's own filter."""
    if options.where is None:
        return config
    config = config.copy_and_resolve_references()
    config.data.where = options.where
    return config


def _data_config(config, options: EvaluationOptions):
    data = config.data
    if options.data_dir:
        data = data.copy_and_resolve_references()
        data.data_dir = options.data_dir
    return data


def class_zero_shot(encoder: ClipEncoder, image_embeddings, examples, data_config, cache) -> dict:
    """Zero-shot top-1 (and top-5 with >= 5 classes) over a labelled dataset's class names, each
    class captioned as the dataset captions it (`label_class_prompts`); `cache` keeps the class
    embeddings between splits."""
    classes = examples.classes
    if "classes" not in cache:
        template, prompts = label_class_prompts(classes, data_config)
        cache["classes"] = template, encoder.encode_texts(prompts)
    template, class_embeddings = cache["classes"]
    ks = (1, 5) if classes.num_classes >= 5 else (1,)
    top = zero_shot_top_k_accuracy(image_embeddings, class_embeddings, examples.class_ids, ks)
    return {
        **{f"top{k}": value for k, value in top.items()},
        "num_classes": classes.num_classes,
        "features": list(classes.features),
        "template": template,
    }


def evaluate_clip_run(run_dir: str, config, options: EvaluationOptions) -> dict:
    """Zero-shot attribute accuracy (shapes), zero-shot top-1/5 over the class names (labelled
    datasets) and retrieval recall@1/5/10 on each split."""
    encoder = ClipEncoder.load(run_dir, options.batch_size)
    data_config = _data_config(config, options)
    classifiers = {}
    result = {"splits": {}}
    for split in options.splits:
        examples = load_split_examples(data_config, config.seed, split, options.num_samples)
        image_embeddings = encoder.encode_images(examples.images)
        text_embeddings = encoder.encode_texts(examples.captions)
        # An item whose caption is identical to the partner's is a hit (labelled datasets).
        recalls = retrieval_metrics(
            image_embeddings, text_embeddings, ks=(1, 5, 10), captions=examples.captions
        )
        entry = {
            "num_examples": len(examples.captions),
            "clip_score": clip_score(image_embeddings, text_embeddings),
            "retrieval": {k: float(v) for k, v in recalls.items()},
        }
        if examples.classes is not None:
            entry["zero_shot_classes"] = class_zero_shot(
                encoder, image_embeddings, examples, data_config, classifiers
            )
        if all(a in examples.labels for a in ATTRIBUTES):  # shapes (not moving_shapes)
            zero_shot = {}
            for attribute in ATTRIBUTES:
                if attribute not in classifiers:
                    classifiers[attribute] = encoder.zero_shot_classifier(attribute)
                zero_shot[attribute] = zero_shot_accuracy(
                    image_embeddings, classifiers[attribute], examples.labels[attribute]
                )
            zero_shot["mean"] = float(np.mean([zero_shot[a] for a in PROMPTED_ATTRIBUTES]))
            entry["zero_shot"] = zero_shot
        result["splits"][split] = entry
    return result


def _gallery(title, grid_path, captions, reading, labels, count) -> dict:
    """What the report shows under a grid: each prompt and, with an oracle, what it read."""
    items = []
    for i in range(min(count, len(captions))):
        item = {"prompt": captions[i]}
        if reading is not None:
            item["read"] = reading.names(i)
            item["correct"] = {
                a: bool(getattr(reading, a)[i] == labels[a][i]) for a in PROMPTED_ATTRIBUTES
            }
        items.append(item)
    return {"title": title, "image": grid_path, "items": items}


def _frame_colors(reading, labels, count):
    if reading is None:
        return None
    right = np.all([getattr(reading, a) == labels[a] for a in PROMPTED_ATTRIBUTES], axis=0)
    return [(40, 170, 60) if ok else (210, 40, 40) for ok in right[:count]]


def evaluate_dit_run(
    checkpoint: str, config, options: EvaluationOptions, output_dir: str, stop=None
):
    """Samples for each split's captions over the sweep; scores them. -> (metrics, galleries).
    stop: called before each setting of the sweep and each diversity check; True ends the
    evaluation (EvaluationStopped)."""
    features = _feature_autoencoder(checkpoint, options)  # a bad path fails before any sampling
    pipe = TextToImage.from_run(checkpoint)
    if features is not None:
        features.check_resolution(pipe.image_size)
    samplers = sweep.checked_samplers(pipe, options)
    clip_checkpoint = options.clip_checkpoint or config.text_encoder.checkpoint
    encoder = ClipEncoder.load(clip_checkpoint, options.batch_size)
    scored_by = {"clip_checkpoint": os.path.abspath(clip_checkpoint)}
    metrics = sweep.metrics_head(pipe, samplers, options, model=scored_by)
    if features is not None:
        metrics["feature_autoencoder"] = os.path.abspath(features.path)
    galleries = []
    os.makedirs(os.path.join(output_dir, "grids"), exist_ok=True)
    progress = sweep.progress_bar(options, samplers)
    for split in options.splits:
        examples = load_split_examples(
            _data_config(config, options),
            config.seed,
            split,
            options.num_samples,
            options.source_data_dir,
        )
        labels, captions = examples.labels, examples.captions
        real_embeddings = encoder.encode_images(examples.images)
        text_embeddings = encoder.encode_texts(captions)
        real = {"clip_score": clip_score(real_embeddings, text_embeddings)}
        real_reading = read_attributes(examples.images) if labels else None
        if labels:
            real["oracle_accuracy"] = attribute_accuracy(real_reading, labels)
        real_features = features.encode(examples.images) if features is not None else None
        entry = {"num_samples": len(captions), "real": real, "samples": {}}
        settings = sweep.settings_of_split(pipe, split, captions, samplers, options, progress, stop)
        for setting, images, seconds in settings:
            embeddings = encoder.encode_images(images)
            result = {
                "clip_score": clip_score(embeddings, text_embeddings),
                "frechet_distance": (
                    frechet_distance_of_features(real_embeddings, embeddings)
                    if len(captions) >= 2
                    else None
                ),
                "seconds": seconds,
            }
            if features is not None:
                result["autoencoder_frechet_distance"] = (
                    frechet_distance_of_features(real_features, features.encode(images))
                    if len(captions) >= 2
                    else None
                )
            reading = read_attributes(images) if labels else None
            if reading is not None:
                result["accuracy"] = attribute_accuracy(reading, labels)
                result["misreads"] = misreads(reading, labels)
                result["open_attributes"] = open_attribute_metrics(
                    reading, real_reading, labels, captions
                )
            name = f"{setting.file_stem}.png"
            count = min(options.grid_size, len(captions))
            report.save_grid(
                images[:count],
                os.path.join(output_dir, "grids", name),
                frame_colors=_frame_colors(reading, labels, count),
            )
            result["grid"] = f"grids/{name}"
            setting.store(entry["samples"], result)
            galleries.append(
                _gallery(setting.title, result["grid"], captions, reading, labels, count)
                | setting.gallery_tags
            )
        entry["best"] = sweep.best_setting(entry["samples"], _setting_score, drop="grid")
        if labels and options.diversity_captions > 0:
            # Every setting's diversity (guidance trades it for accuracy); the best's grids.
            best = entry["best"]
            for sampler, by_scale in entry["samples"].items():
                for scale, result in by_scale.items():
                    if stop is not None and stop():
                        raise sweep.EvaluationStopped(
                            f"stopped before the diversity check of {split} {sampler} {scale}"
                        )
                    setting = {"sampler": sampler, "guidance_scale": float(scale)}
                    is_best = (sampler, float(scale)) == (best["sampler"], best["guidance_scale"])
                    result["diversity"], extra = diversity_check(
                        pipe,
                        examples,
                        split,
                        setting,
                        options,
                        config.seed,
                        output_dir if is_best else None,
                    )
                    if is_best:
                        entry["diversity"] = result["diversity"]
                        galleries.extend(extra)
        metrics["splits"][split] = entry
    progress.close()
    if options.negative_color and all("accuracy" in s["best"] for s in metrics["splits"].values()):
        first = metrics["splits"][options.splits[0]]["best"]
        metrics["negative_prompt"], extra = negative_prompt_check(
            pipe,
            options,
            first["sampler"],
            negative_check_scale(first["guidance_scale"], options.guidance_scales),
            output_dir,
        )
        galleries.extend(extra)
    return metrics, galleries


def _feature_autoencoder(checkpoint: str, options) -> AutoencoderFeatures | None:
    """The autoencoder whose encoder gives the second Frechet distance's features: a latent
    run's own, or --feature_autoencoder's; None for a pixel run without the flag."""
    run_dir = rundir.locate_run(checkpoint, "DiT run").run_dir
    located = feature_autoencoder_path(run_dir, options.feature_autoencoder)
    if located is None:
        return None
    return AutoencoderFeatures.load(*located, options.batch_size)


def _setting_score(result: dict) -> tuple:
    """How the best setting is chosen: the highest all-four accuracy; ties go to the higher mean
    attribute accuracy, then the higher CLIP score (the CLIP score alone without an oracle)."""
    accuracy = result.get("accuracy")
    read = sweep.accuracy_score(accuracy, "all", PROMPTED_ATTRIBUTES) if accuracy else ()
    return read + (result["clip_score"],)


# ---------------------------------------------------------------------------------------------
# The entry point's library function
# ---------------------------------------------------------------------------------------------


def _flatten(tree: dict, prefix: str = "") -> dict[str, float]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(_flatten(value, name))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def evaluate_checkpoint(
    checkpoint: str, output_dir: str, options: EvaluationOptions, stop=None
) -> dict:
    """Evaluates a CLIP, DiT or autoencoder run directory (or a diffusers AutoencoderKL
    directory); writes OUTPUT_DIR/metrics.json, TensorBoard scalars (OUTPUT_DIR/tensorboard,
    step = the checkpoint step) and OUTPUT_DIR/index.html.

    metrics.json, common keys: family ("clip" | "dit" | "autoencoder"), checkpoint (absolute path),
    checkpoint_step, splits: {split: ...}.
      CLIP:  splits[split] = {num_examples, clip_score (real pairs),
               zero_shot: {shape, color, size, position, background, mean (of the first four)},
               zero_shot_classes (a labelled dataset, `held_out.class_space_of`): {top1,
                 top5 (with >= 5 classes), num_classes, features, template},
               retrieval: {image_to_text_recall@1|5|10, text_to_image_recall@1|5|10}; a
                 retrieved caption or image whose caption equals the partner's is a hit}
      DiT:   resolution, objective, clip_checkpoint, guidance_scales, samplers ["euler:20", ...],
             splits[split] = {num_samples,
               real: {clip_score, oracle_accuracy: {<attribute>..., all}},
               samples: {"<sampler>:<steps>": {"<scale>": {accuracy: {shape, color, size,
                   position, background, all}, misreads (`shapes_oracle.misreads`),
                   clip_score, frechet_distance, seconds, grid,
                   autoencoder_frechet_distance (with an autoencoder),
                   open_attributes: {background: {total_variation, num_captions},
                     position_spread_ratio, size_spread_ratio}}}},
               best: {sampler, guidance_scale, accuracy, clip_score, frechet_distance, seconds,
                   autoencoder_frechet_distance, open_attributes},
               diversity: {sampler, guidance_scale, num_captions, samples_per_caption, ratio,
                   ratio_min, fraction_at_target, real_ratio, background_total_variation,
                   background_total_variation_real, num_open_background_captions, samples_grid,
                   real_grid} (`fidelity.caption_diversity`) of the best setting; each
                   setting's result in samples holds its own (grids: the best's alone)},
             feature_autoencoder (the autoencoder of autoencoder_frechet_distance, if any),
             negative_prompt: {prompt, negative_prompt, sampler, guidance_scale, num_samples,
               without_negative: {color_fraction, color_histogram}, with_negative: {...}}
      video DiT: resolution, frames, objective, guidance_scales, samplers, splits[split] =
             {num_samples, real: {oracle_accuracy, temporal_consistency}, samples:
               {"<sampler>:<steps>": {"<scale>": {accuracy: {shape, color, size, motion,
               speed, background, all}, temporal_consistency: {consistency,
               background_change}, seconds, clips}}}, best} (`video_evaluation`).
      class-conditional DiT: conditioning "class" and the keys of
             `class_conditional.evaluate_class_dit_run` (accuracy of the asked class).
      autoencoder: source ("run" | "diffusers"), resolution, latent_channels,
             downsampling_factor, configured_scaling_factor, configured_shift_factor,
             splits[split] = {num_examples, psnr, psnr_min, ssim, latent_shape, grid,
               latents: {mean, std (per channel), overall_mean, overall_std, scaling_factor,
                 shift_factor, posterior_std}, oracle_accuracy (of the reconstructions),
               real_oracle_accuracy} (`reconstruction.reconstruction_metrics`).
    Fractions are in [0, 1]; "all" = shape, color, size and position all right. Every
    family's metrics.json also records the options its evaluation read (`options_record`).
    stop: a DiT's sweep calls it before each setting; True ends the evaluation with
    EvaluationStopped and writes nothing (a pipeline's SIGTERM: the rerun evaluates again).
    """
    if not os.path.exists(checkpoint):
        raise UserError(
            f"--checkpoint={checkpoint!r} does not exist; pass a CLIP, DiT or autoencoder run "
            "directory (the --workdir of train.py) or a diffusers AutoencoderKL directory"
        )
    if options.num_samples < 1:
        raise UserError(f"--num_samples must be >= 1, got {options.num_samples}")
    if not options.guidance_scales:
        raise UserError("--guidance_scales is empty; give at least one scale, e.g. 1,2,4,6")
    if options.diversity_captions < 0:
        raise UserError(
            f"--diversity_captions must be >= 0 (0 skips the diversity check), got "
            f"{options.diversity_captions}"
        )
    if options.diversity_captions and options.diversity_samples < 2:
        raise UserError(
            f"--diversity_samples must be >= 2 to measure distances between samples, got "
            f"{options.diversity_samples} (or pass --diversity_captions=0 to skip the check)"
        )
    if options.negative_color and options.negative_color not in shapes_lib.COLORS:
        raise UserError(
            f"--negative_color={options.negative_color!r} is not a shapes color; valid: "
            f"{', '.join(shapes_lib.COLOR_NAMES)} (or '' to skip the check)"
        )
    if rundir.is_diffusers_directory(checkpoint):  # an imported autoencoder: no run directory
        family, model_config, config = "autoencoder", None, None
    else:
        run_dir = rundir.locate_run(checkpoint).run_dir if os.path.isdir(checkpoint) else checkpoint
        family, model_config = rundir.load_model_config(run_dir)
        config = with_where(rundir.load_run_config(run_dir), options)
    os.makedirs(output_dir, exist_ok=True)
    galleries = []
    if family == "clip":
        metrics = {"family": "clip", "checkpoint": os.path.abspath(checkpoint)}
        metrics["checkpoint_step"] = rundir.latest_step(run_dir)
        metrics.update(evaluate_clip_run(run_dir, config, options))
    elif family == "autoencoder":  # reconstructions and latent statistics
        metrics = {"family": "autoencoder", "checkpoint": os.path.abspath(checkpoint)}
        autoencoder_metrics, galleries = evaluate_autoencoder_run(
            checkpoint, config, options, output_dir
        )
        metrics.update(autoencoder_metrics)
    elif family == "video_dit" and rundir.run_frames(config):  # clips: the moving-shapes oracle
        metrics = {"family": "video_dit", "checkpoint": os.path.abspath(checkpoint)}
        video_metrics, galleries = evaluate_video_dit_run(
            checkpoint, config, options, output_dir, stop
        )
        metrics.update(video_metrics)
    elif family == "dit" and model_config.conditioning == "class":  # by class: shapes oracle
        metrics = {"family": "dit", "conditioning": "class"}
        metrics["checkpoint"] = os.path.abspath(checkpoint)
        dit_metrics, galleries = evaluate_class_dit_run(
            checkpoint, _data_config(config, options), config.seed, options, output_dir, stop
        )
        metrics.update(dit_metrics)
    else:  # images of a text-conditioned DiT, or of a video DiT trained on images
        metrics = {"family": family, "checkpoint": os.path.abspath(checkpoint)}
        dit_metrics, galleries = evaluate_dit_run(checkpoint, config, options, output_dir, stop)
        metrics.update(dit_metrics)
    metrics["options"] = options_record(options, family)
    with open(os.path.join(output_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)
    writer = metrics_lib.MetricWriter(output_dir, enabled=True)
    scalars = {
        k: v
        for k, v in _flatten(
            metrics["splits"] | {"negative": metrics.get("negative_prompt", {})}
        ).items()
        if not k.endswith("checkpoint_step") and "misreads/" not in k  # counts, not curves
    }
    writer.write_scalars(metrics.get("checkpoint_step") or 0, scalars)
    writer.close()
    report.write_report(metrics, galleries, output_dir)
    return metrics
