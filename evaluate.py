"""Evaluates a CLIP, DiT or autoencoder run directory (or a diffusers AutoencoderKL directory):
metrics.json, TensorBoard scalars and an HTML report.

python evaluate.py --checkpoint=runs/shapes/dit --output_dir=runs/shapes/eval \
    [--num_samples=512 --guidance_scales=1,2,4,6 --samplers=euler:20,dpmpp_2m:20 \
     --splits=test,test_unseen --clip_checkpoint=runs/shapes/clip --batch_size=64 \
     --eta=0 --shift= --guidance_rescale=0 --guidance_interval=]

CLIP run: zero-shot attribute accuracy (shapes) or top-1/top-5 over the class names (a labelled
dataset), and image-text retrieval on each split.
DiT run: samples for each split's captions over the guidance x sampler sweep, scored by the shapes
oracle (attribute accuracy), CLIP score and the Frechet distance in CLIP space (and in an
autoencoder's latent space); what captions leave open (background, placement) against the data;
per-caption diversity; plus a negative-prompt check.
Autoencoder: PSNR and SSIM of each split's reconstructions, the shapes oracle on them, and the
latents' per-channel mean and std with the implied scaling_factor and shift_factor.
Key layout: `diffusion.evaluation.evaluate_checkpoint`.
"""

from absl import app, flags, logging

from diffusion.errors import UserError, error_boundary, parse_flags_or_exit

flags.DEFINE_string(
    "checkpoint",
    None,
    "CLIP, DiT or autoencoder run directory (train.py --workdir), or a diffusers AutoencoderKL "
    "directory.",
)
flags.DEFINE_string("output_dir", None, "Where metrics.json, index.html and the plots go.")
flags.DEFINE_integer("num_samples", 512, "Captions (and samples) per split.")
flags.DEFINE_string("guidance_scales", "1,2,4,6", "DiT: comma-separated guidance scales.")
flags.DEFINE_string(
    "samplers",
    "",
    "DiT: NAME:STEPS,... e.g. euler:20,ddim:50 (default euler:20, ddim:20 for DDPM).",
)
flags.DEFINE_string("splits", "test,test_unseen", "Held-out splits of the run's dataset.")
flags.DEFINE_string(
    "clip_checkpoint", None, "DiT: CLIP for CLIP score / FD (default: its own text encoder run)."
)
flags.DEFINE_integer("batch_size", 64, "Samples per sampling program and embedding call.")
flags.DEFINE_integer("grid_size", 16, "Samples per grid in the report.")
flags.DEFINE_string("negative_prompt", "a large circle in the center", "Negative-prompt check.")
flags.DEFINE_string("negative_color", "red", "Color used as the negative prompt ('' skips it).")
flags.DEFINE_string("data_dir", None, "TFDS data_dir, overriding the run's config.data.data_dir.")
flags.DEFINE_string(
    "source_data_dir",
    None,
    "A DiT trained on encode.py latents: data_dir of the images they were encoded from, where "
    "they are no longer at the path its encoding.json records.",
)
flags.DEFINE_integer(
    "resolution",
    None,
    "Autoencoder: the shapes resolution to reconstruct (16, 32 or 64; default: the run's, or a "
    "diffusers directory's sample_size).",
)
flags.DEFINE_integer(
    "diversity_captions",
    8,
    "DiT: captions per split sampled --diversity_samples times at the split's best setting, "
    "for the per-caption diversity ratio (0 skips it).",
)
flags.DEFINE_integer("diversity_samples", 8, "DiT: samples (seeds) per diversity caption.")
flags.DEFINE_string(
    "feature_autoencoder",
    None,
    "DiT: autoencoder run (or diffusers AutoencoderKL directory) whose encoder gives the "
    "features of a second Frechet distance (default: a latent DiT's own autoencoder; a pixel "
    "DiT has none without this flag).",
)
flags.DEFINE_string(
    "where",
    None,
    "Evaluate on the records whose ClassLabels match, KEY=NAME,... e.g. motion=up (default: the "
    "run's config.data.where, the filter it was trained with; '' evaluates every record).",
)
flags.DEFINE_float("eta", 0.0, "DiT: DDIM / stochastic-Euler noise of every setting (0: none).")
flags.DEFINE_float(
    "shift", None, "DiT: flow time shift of the sampling grid (default: the training shift)."
)
flags.DEFINE_float("guidance_rescale", 0.0, "DiT: guidance rescale phi (Lin et al. 2023).")
flags.DEFINE_string(
    "guidance_interval",
    "",
    "DiT: T_LO,T_HI: guidance only at times in [T_LO, T_HI] (flow: 1 is pure noise), the "
    "conditional model elsewhere (Kynkaanniemi et al. 2024); '' guides every step.",
)
FLAGS = flags.FLAGS


def options_from_flags():
    from diffusion import evaluation
    from diffusion.inference import parse_guidance_interval

    splits = tuple(s.strip() for s in FLAGS.splits.split(",") if s.strip())
    if not splits:
        raise UserError("--splits is empty; name held-out splits such as test,test_unseen")
    if FLAGS.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {FLAGS.batch_size}")
    return evaluation.EvaluationOptions(
        num_samples=FLAGS.num_samples,
        splits=splits,
        guidance_scales=evaluation.parse_guidance_scales(FLAGS.guidance_scales),
        samplers=evaluation.parse_samplers(FLAGS.samplers),
        clip_checkpoint=FLAGS.clip_checkpoint,
        batch_size=FLAGS.batch_size,
        grid_size=FLAGS.grid_size,
        negative_prompt=FLAGS.negative_prompt,
        negative_color=FLAGS.negative_color,
        data_dir=FLAGS.data_dir,
        source_data_dir=FLAGS.source_data_dir,
        resolution=FLAGS.resolution,
        diversity_captions=FLAGS.diversity_captions,
        diversity_samples=FLAGS.diversity_samples,
        feature_autoencoder=FLAGS.feature_autoencoder,
        where=FLAGS.where,
        eta=FLAGS.eta,
        shift=FLAGS.shift,
        guidance_rescale=FLAGS.guidance_rescale,
        guidance_interval=parse_guidance_interval(FLAGS.guidance_interval),
    )


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log every file at INFO
    with error_boundary("evaluate.py"):
        if not FLAGS.checkpoint:
            raise UserError(
                "--checkpoint is required: a CLIP, DiT or autoencoder run directory, or a "
                "diffusers AutoencoderKL directory."
            )
        if not FLAGS.output_dir:
            raise UserError("--output_dir is required, e.g. --output_dir=runs/shapes/eval.")
        options = options_from_flags()
        from diffusion import evaluation  # after flag checks: importing jax is slow

        evaluation.evaluate_checkpoint(FLAGS.checkpoint, FLAGS.output_dir, options)
    print(f"metrics: {FLAGS.output_dir}/metrics.json  report: {FLAGS.output_dir}/index.html")


if __name__ == "__main__":
    app.run(main, flags_parser=lambda argv: parse_flags_or_exit(argv, "evaluate.py"))
