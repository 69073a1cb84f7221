"""What a trained shapes DiT predicts at each noise level: the oracle's reading of its x0 guess.

    .venv/bin/python scripts/probe_denoiser.py runs/shapes/dit [--num=512] [--times=1,0.9,...]

Each of the first --num `test` images is noised to x_t = (1 - t) x0 + t eps (one fixed eps per
image, the same for every t) and the DiT (its EMA weights, conditioned on the image's caption,
no guidance) predicts x0_hat from x_t; the shapes oracle then reads x0_hat like a sample. At
t = 1 the input is pure noise, so x0_hat is the model's idea of E[x0 | caption] alone: an
attribute read right there is one the model draws from the prompt; one read right only at
lower t is one it merely denoises from what x_t still shows. A sampler starts at t = 1, so an
attribute that the model gets only from x_t is left to chance in its samples.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import evaluation, models, objectives, rundir
from diffusion.data import load_tokenizer, tokenize
from diffusion.families import dit as dit_family
from diffusion.inference.program import to_uint8
from diffusion.rundir import load_run_config, locate_run


def predicted_x0(dit, prediction_type, text_encoder, tokens, mask, images, t, noise):
    """x0_hat of the DiT at time t for clean `images` in [-1, 1] noised with `noise`."""
    cond = dit_family.text_condition(text_encoder, tokens, mask, words=dit.config.word_conditioning)
    x_t = (1 - t) * images + t * noise  # (B, H, W, C)
    output = dit_family.dit_model_fn(dit)(x_t, jnp.full((images.shape[0],), t), cond)
    x0, _ = objectives.x0_eps_from_prediction(output, x_t, 1 - t, t, prediction_type)
    return x0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a DiT run directory (WORKDIR/dit of the default pipeline)")
    parser.add_argument("--num", type=int, default=512, help="test images to noise and read")
    parser.add_argument("--times", default="1,0.95,0.9,0.8,0.6,0.4,0.2", help="times t to probe")
    parser.add_argument("--batch", type=int, default=128, help="images per model call")
    args = parser.parse_args()

    run_dir = locate_run(args.run).run_dir
    config = load_run_config(run_dir)
    _, model_config = rundir.load_model_config(run_dir)
    dit = rundir.load_run_params(run_dir, model_config, models.DiT)  # the EMA weights
    prediction_type = dit_family.prediction_type_of(config.diffusion)
    text_encoder = rundir.load_text_encoder(config.text_encoder.checkpoint, {"dtype": "float32"})
    tokenizer = load_tokenizer(os.path.join(run_dir, rundir.TOKENIZER_DIR))  # saved with the run
    examples = evaluation.load_split_examples(config.data, config.seed, "test", args.num)
    if not examples.labels:
        raise SystemExit(f"{args.run}: its dataset has no attribute labels for the oracle")
    tokens, mask = tokenize(tokenizer, examples.captions, config.tokenizer.context_length)
    images = examples.images.astype(np.float32) / 127.5 - 1.0
    noise = np.asarray(jax.random.normal(jax.random.key(0), images.shape, jnp.float32))
    model_call = jax.jit(
        lambda *inputs: to_uint8(predicted_x0(dit, prediction_type, text_encoder, *inputs))
    )
    attributes = ("shape", "color", "size", "position", "background", "all")
    print(f"{'t':>5}  " + "  ".join(f"{name:>10}" for name in attributes))
    for t in (float(v) for v in args.times.split(",")):
        reads = [
            np.asarray(
                model_call(
                    tokens[i : i + args.batch],
                    mask[i : i + args.batch],
                    images[i : i + args.batch],
                    jnp.float32(t),
                    noise[i : i + args.batch],
                )
            )
            for i in range(0, len(images), args.batch)
        ]
        reading = evaluation.read_attributes(np.concatenate(reads))
        accuracy = evaluation.attribute_accuracy(reading, examples.labels)
        print(f"{t:>5.2f}  " + "  ".join(f"{accuracy[name]:>10.3f}" for name in attributes))


if __name__ == "__main__":
    main()
