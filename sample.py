"""Samples a DiT checkpoint for every prompt of a file (or every class of a list): PNGs,
manifest.jsonl and grid.png; a video DiT's clips as an MP4 and an animated GIF each, and a frame
strip as grid.png.

python sample.py --checkpoint=runs/shapes/dit --prompts=prompts.txt --output_dir=samples \
    [--sampler=euler --steps=20 --guidance_scale=3 --negative_prompt= --seed=0 \
     --num_per_prompt=1 --batch_size=16 --eta=0 --shift= --guidance_rescale=0 --guidance_interval=]
python sample.py --checkpoint=runs/shapes_class --class_labels="3,red circle" --output_dir=...
python sample.py --checkpoint=Wan2.1-T2V-1.3B-Diffusers --prompts=prompts.txt --output_dir=... \
    [--num_frames=81 --height=480 --width=832]
python sample.py --config=configs/wan21_t2v_1_3b.py --config.weights=DIR --prompts=... \
    --output_dir=...

--prompts is a .txt file (one prompt per line) or a .jsonl file ({"prompt", "negative_prompt",
"seed", "guidance_scale"} per line; the flags give the defaults; a class-conditional run takes
{"class", "seed", "guidance_scale"} lines, the class an id or a name such as "red circle").
--class_labels samples a class-conditional run without a file. --checkpoint may also be a
diffusers-format Wan 2.1 directory (its defaults: UniPC, 50 steps, the scheduler's shift,
guidance 5, 16 fps), or --config a sampling recipe naming one (configs/wan21_t2v_*.py: its
config.sampling gives the defaults; flags still win). Rerunning with the same
arguments skips finished images; each image depends only on its prompt (or class), seed and
settings.
"""

from absl import app, flags, logging

from diffusion import config as config_lib
from diffusion.errors import UserError, error_boundary, parse_flags_or_exit

flags.DEFINE_string(
    "checkpoint",
    None,
    "DiT run directory, a checkpoints/<step> inside it, or a diffusers Wan 2.1 directory.",
)
flags.DEFINE_string("prompts", None, "Prompt file: .txt (one per line) or .jsonl.")
flags.DEFINE_list(
    "class_labels", None, "Class-conditional run: classes to sample, ids or names (3,red circle)."
)
flags.DEFINE_string("output_dir", None, "Where the PNGs, manifest.jsonl and grid.png go.")
flags.DEFINE_string(
    "sampler",
    None,
    "euler, heun, euler_stochastic, ddim, dpmpp_2m, unipc, ddpm (default: euler; Wan: unipc).",
)
flags.DEFINE_integer("steps", None, "Denoising steps (default: 20; Wan: 50).")
flags.DEFINE_float("guidance_scale", None, "Guidance scale, 1: none (default: 3; Wan: 5).")
flags.DEFINE_string("negative_prompt", None, "Negative prompt of every line that has none.")
flags.DEFINE_integer("seed", 0, "Seed of every line that has none; sample k uses seed + k.")
flags.DEFINE_integer("num_per_prompt", 1, "Images per prompt.")
flags.DEFINE_integer("batch_size", None, "Images per program call (default 16).")
flags.DEFINE_float("eta", 0.0, "DDIM / stochastic Euler noise (0: deterministic).")
flags.DEFINE_float("shift", None, "Flow time shift of the sampling grid (default: training's).")
flags.DEFINE_float("guidance_rescale", 0.0, "Guidance rescale phi (Lin et al. 2023).")
flags.DEFINE_string(
    "guidance_interval",
    "",
    "T_LO,T_HI: guidance only at times in [T_LO, T_HI] (flow: 1 is pure noise), the "
    "conditional model elsewhere (Kynkaanniemi et al. 2024); '' guides every step.",
)
flags.DEFINE_float("fps", None, "Frames per second of written clips (default: 8; Wan: 16).")
flags.DEFINE_integer("num_frames", None, "Wan: frames per clip, 1 + 4k (default 81).")
flags.DEFINE_integer("height", None, "Wan: frame height, a multiple of 16 (default 480).")
flags.DEFINE_integer("width", None, "Wan: frame width, a multiple of 16 (default 832).")
flags.DEFINE_bool("use_ema", True, "Sample the EMA weights (else the raw trained ones).")
flags.DEFINE_string(
    "text_encoder", None, "The DiT's CLIP run where it is now (default: the path the run recorded)."
)
FLAGS = flags.FLAGS
_CONFIG = {}
WAN_SIZE_FLAGS = ("num_frames", "height", "width")


def _split_and_parse(argv):
    remaining, spec, overrides = config_lib.split_config_flags(argv)
    _CONFIG.update(spec=spec, overrides=overrides)
    return FLAGS(remaining)


def _load_recipe():
    """The sampling recipe of --config (configs/wan21_t2v_*.py), or None."""
    if _CONFIG.get("spec") is None:
        return None
    recipe = config_lib.load_config(_CONFIG["spec"], _CONFIG["overrides"])
    if recipe.get("family") != "sampling":
        raise UserError(
            f"--config={_CONFIG['spec']} is a training recipe; sample.py takes a sampling recipe "
            "such as configs/wan21_t2v_1_3b.py, and a trained run with --checkpoint=RUN_DIR."
        )
    if FLAGS.checkpoint:
        raise UserError("give --checkpoint or --config (whose config.weights names the weights).")
    return recipe


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file at INFO
    with error_boundary("sample.py"):
        recipe = _load_recipe()
        if not FLAGS.output_dir:
            raise UserError("--output_dir is required; see python sample.py --help.")
        if not FLAGS.checkpoint and recipe is None:
            raise UserError("--checkpoint is required; see python sample.py --help.")
        if FLAGS.prompts and FLAGS.class_labels:
            raise UserError("give --prompts or --class_labels, not both.")
        if not FLAGS.prompts and not FLAGS.class_labels:
            raise UserError(
                "--prompts is required (or --class_labels for a class-conditional run); see "
                "python sample.py --help."
            )
        from diffusion import inference  # after flag parsing: importing jax is slow
        from diffusion.inference import wan_directory, wan_pipeline

        wan = recipe is not None or wan_directory.is_wan_directory(FLAGS.checkpoint)
        recipe_options = dict(recipe.sampling) if recipe is not None else {}

        def option(name, fallback, wan_fallback=None):
            """The flag if given, else the recipe's value, else the model's default."""
            if FLAGS[name].value is not None:
                return FLAGS[name].value
            return recipe_options.get(name, wan_fallback if wan else fallback)

        if not wan and any(FLAGS[name].value is not None for name in WAN_SIZE_FLAGS):
            raise UserError(
                "--num_frames, --height and --width apply to a Wan 2.1 directory; a DiT run "
                "samples at its training size."
            )
        defaults = dict(
            seed=FLAGS.seed,
            guidance_scale=option("guidance_scale", 3.0, 5.0),
            num_per_prompt=FLAGS.num_per_prompt,
        )
        if FLAGS.class_labels:
            labels = [int(c) if c.strip().isdigit() else c.strip() for c in FLAGS.class_labels]
            items = inference.class_label_items(labels, **defaults)
        else:
            items = inference.read_prompt_file(
                FLAGS.prompts, negative_prompt=option("negative_prompt", ""), **defaults
            )
        sampler_options = {
            name: option(name, None)
            for name in ("sampler", "steps", "shift")
            if option(name, None) is not None
        }
        if "sampler" in sampler_options:
            inference.check_sampler_name(sampler_options["sampler"])
        guidance_interval = inference.parse_guidance_interval(FLAGS.guidance_interval)
        if "steps" in sampler_options:
            inference.check_steps(sampler_options["steps"])
        if recipe is not None:
            pipe = wan_pipeline.from_recipe(recipe)
        else:
            pipe = inference.load_pipeline(
                FLAGS.checkpoint, use_ema=FLAGS.use_ema, text_encoder=FLAGS.text_encoder
            )
        if wan:
            pipe = pipe.with_size(*(FLAGS[name].value for name in WAN_SIZE_FLAGS))
        if isinstance(pipe, inference.ClassToImage) and FLAGS.negative_prompt:
            raise UserError(
                "--negative_prompt does not apply to a class-conditional run (guidance pushes "
                "away from the null class); leave it out."
            )
        settings = pipe.settings(
            eta=FLAGS.eta,
            guidance_rescale=FLAGS.guidance_rescale,
            guidance_interval=guidance_interval,
            **sampler_options,
        )
        result = inference.sample_to_directory(
            pipe,
            items,
            FLAGS.output_dir,
            settings=settings,
            batch_size=FLAGS.batch_size,
            fps=option("fps", 8.0, 16.0),
        )
        made = "clips" if getattr(pipe, "frames", 0) else "images"
        print(
            f"{result['generated']} {made} made, {result['skipped']} already there -> "
            f"{FLAGS.output_dir}",
            flush=True,
        )


if __name__ == "__main__":
    app.run(
        main, flags_parser=lambda argv: parse_flags_or_exit(argv, "sample.py", _split_and_parse)
    )
