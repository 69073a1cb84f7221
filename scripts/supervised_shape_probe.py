"""How fast can the CLIP image tower learn shape when it is told to? A supervised ceiling.

    .venv/bin/python scripts/supervised_shape_probe.py runs/shapes/clip [--steps=300] \
        [--set vision_stem=conv --set vision_depth=4 ...]

The tower of the run's CLIPConfig (fresh random weights; --set overrides its fields), with a
linear head on its pooled output, trained with AdamW 1e-3 on batches of 64 `train` images to
name the shape (cross entropy); prints the `test` accuracy of the 5 shapes. The contrastive loss
asks for shape only through captions, so CLIP's zero-shot shape accuracy after N steps cannot be
expected above this figure for the same tower and N steps (docs/default_recipe.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import numpy as np
import optax
from flax import nnx

from diffusion import evaluation, models, rundir
from diffusion.rundir import load_run_config


class ShapeProbe(nnx.Module):
    """The image tower of a CLIP and a linear map from its pooled state to the shape logits."""

    def __init__(self, config: models.CLIPConfig, num_classes: int, rngs: nnx.Rngs):
        self.clip = models.CLIP(config, rngs=rngs)
        self.head = nnx.Linear(config.vision_width, num_classes, rngs=rngs)

    def __call__(self, images):
        _, pooled = self.clip.vision(images)
        return self.head(pooled)


def parse_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("clip_run", help="a CLIP run directory (its config, data and tokenizer)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--num_train", type=int, default=20_000)
    parser.add_argument("--num_test", type=int, default=1024)
    parser.add_argument("--set", action="append", default=[], help="CLIPConfig FIELD=VALUE")
    args = parser.parse_args()

    _, model_config = rundir.load_model_config(args.clip_run)
    fields = dict(item.split("=", 1) for item in args.set)
    model_config = dataclasses.replace(
        model_config, **{k: parse_value(v) for k, v in fields.items()}
    )
    run_config = load_run_config(args.clip_run)
    train = evaluation.load_split_examples(
        run_config.data, run_config.seed, "train", args.num_train
    )
    test = evaluation.load_split_examples(run_config.data, run_config.seed, "test", args.num_test)
    to_input = lambda images: images.astype(np.float32) / 127.5 - 1.0

    model = ShapeProbe(model_config, len(evaluation.VOCABULARIES["shape"]), nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, images, labels):
        def loss_fn(model):
            logits = model(images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    rng = np.random.default_rng(0)
    labels = train.labels["shape"]
    start = time.perf_counter()
    for _ in range(args.steps):
        rows = rng.integers(len(labels), size=64)
        loss = step(model, optimizer, to_input(train.images[rows]), labels[rows])
    jax.block_until_ready(loss)
    seconds = time.perf_counter() - start
    logits = nnx.jit(lambda model, images: model(images))(model, to_input(test.images))
    accuracy = float(np.mean(np.argmax(np.asarray(logits), axis=-1) == test.labels["shape"]))
    print(
        f"{args.steps} steps ({', '.join(args.set) or 'the run config'}): test shape accuracy "
        f"{accuracy:.3f}, last batch loss {float(loss):.3f}, {seconds:.1f} s incl. compile"
    )


if __name__ == "__main__":
    main()
