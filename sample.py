"""Samples a DiT checkpoint for every prompt of a file (or every class of a list): PNGs,
manifest.jsonl and grid.png; a video DiT's clips as an MP4 and an animated GIF each, and a frame
strip as grid.png.

python sample.py --checkpoint=runs/shapes/dit --prompts=prompts.txt --output_dir=samples \
    [--sampler=euler --steps=20 --guidance_scale=3 --negative_prompt= --seed=0 \
     --num_per_prompt=1 --batch_size=16 --eta=0 --shift= --guidance_rescale=0]
python sample.py --checkpoint=runs/shapes_class --class_labels="3,red circle" --output_dir=...

--prompts is a .txt file (one prompt per line) or a .jsonl file ({"prompt", "negative_prompt",
"seed", "guidance_scale"} per line; the flags give the defaults; a class-conditional run takes
{"class", "seed", "guidance_scale"} lines, the class an id or a name such as "red circle").
--class_labels samples a class-conditional run without a file. Rerunning with the same
arguments skips finished images; each image depends only on its prompt (or class), seed and
settings.
"""

from absl import app, flags, logging

from diffusion.errors import UserError, error_boundary, parse_flags_or_exit

flags.DEFINE_string("checkpoint", None, "DiT run directory, or a checkpoints/<step> inside it.")
flags.DEFINE_string("prompts", None, "Prompt file: .txt (one per line) or .jsonl.")
flags.DEFINE_list(
    "class_labels", None, "Class-conditional run: classes to sample, ids or names (3,red circle)."
)
flags.DEFINE_string("output_dir", None, "Where the PNGs, manifest.jsonl and grid.png go.")
flags.DEFINE_string(
    "sampler", "euler", "euler, heun, euler_stochastic, ddim, dpmpp_2m, unipc (Wan 2.1), ddpm."
)
flags.DEFINE_integer("steps", 20, "Denoising steps.")
flags.DEFINE_float("guidance_scale", 3.0, "Classifier-free guidance scale (1: none).")
flags.DEFINE_string("negative_prompt", "", "Negative prompt of every line that has none.")
flags.DEFINE_integer("seed", 0, "Seed of every line that has none; sample k uses seed + k.")
flags.DEFINE_integer("num_per_prompt", 1, "Images per prompt.")
flags.DEFINE_integer("batch_size", None, "Images per program call (default 16).")
flags.DEFINE_float("eta", 0.0, "DDIM / stochastic Euler noise (0: deterministic).")
flags.DEFINE_float("shift", None, "Flow time shift of the sampling grid (default: training's).")
flags.DEFINE_float("guidance_rescale", 0.0, "Guidance rescale phi (Lin et al. 2023).")
flags.DEFINE_float("fps", 8.0, "Frames per second of a video DiT's MP4s and GIFs.")
flags.DEFINE_bool("use_ema", True, "Sample the EMA weights (else the raw trained ones).")
flags.DEFINE_string(
    "text_encoder", None, "The DiT's CLIP run where it is now (default: the path the run recorded)."
)
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file at INFO
    with error_boundary("sample.py"):
        for name in ("checkpoint", "output_dir"):
            if not FLAGS[name].value:
                raise UserError(f"--{name} is required; see python sample.py --help.")
        if FLAGS.prompts and FLAGS.class_labels:
            raise UserError("give --prompts or --class_labels, not both.")
        if not FLAGS.prompts and not FLAGS.class_labels:
            raise UserError(
                "--prompts is required (or --class_labels for a class-conditional run); see "
                "python sample.py --help."
            )
        from diffusion import inference  # after flag parsing: importing jax is slow

        defaults = dict(
            seed=FLAGS.seed,
            guidance_scale=FLAGS.guidance_scale,
            num_per_prompt=FLAGS.num_per_prompt,
        )
        if FLAGS.class_labels:
            labels = [int(c) if c.strip().isdigit() else c.strip() for c in FLAGS.class_labels]
            items = inference.class_label_items(labels, **defaults)
        else:
            items = inference.read_prompt_file(
                FLAGS.prompts, negative_prompt=FLAGS.negative_prompt, **defaults
            )
        inference.check_sampler_name(FLAGS.sampler)
        inference.check_steps(FLAGS.steps)
        pipe = inference.load_pipeline(
            FLAGS.checkpoint, use_ema=FLAGS.use_ema, text_encoder=FLAGS.text_encoder
        )
        if isinstance(pipe, inference.ClassToImage) and FLAGS.negative_prompt:
            raise UserError(
                "--negative_prompt does not apply to a class-conditional run (guidance pushes "
                "away from the null class); leave it out."
            )
        settings = pipe.settings(
            sampler=FLAGS.sampler,
            steps=FLAGS.steps,
            eta=FLAGS.eta,
            shift=FLAGS.shift,
            guidance_rescale=FLAGS.guidance_rescale,
        )
        result = inference.sample_to_directory(
            pipe,
            items,
            FLAGS.output_dir,
            settings=settings,
            batch_size=FLAGS.batch_size,
            fps=FLAGS.fps,
        )
        made = "clips" if getattr(pipe, "frames", 0) else "images"
        print(
            f"{result['generated']} {made} made, {result['skipped']} already there -> "
            f"{FLAGS.output_dir}",
            flush=True,
        )


if __name__ == "__main__":
    app.run(main, flags_parser=lambda argv: parse_flags_or_exit(argv, "sample.py"))
