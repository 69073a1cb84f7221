"""What a frozen CLIP text tower tells the DiT: linear probes of its outputs per attribute.

    .venv/bin/python scripts/probe_text_tower.py runs/shapes/clip [--train=4000] [--test=1000]

For the captions of the first --train examples of the train split and --test of the test split,
it computes what the DiT is conditioned on (dit_family.text_condition): the pooled embedding
(adaLN), the token states (cross-attention, here averaged over the caption's tokens) and the
word embeddings of the tower's input layer (read with `word_conditioning`; averaged likewise).
For each attribute it prints the test accuracy of a ridge classifier fitted on the train
captions, and the share of the pooled embedding's variance that the attribute's class means
explain. A probe near 1.0 means the attribute is in the conditioning, so a DiT that does
not draw it is limited by what it has learned, not by its text encoder.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import ml_collections
import numpy as np

from diffusion import evaluation, rundir
from diffusion.data import load_tokenizer, tokenize
from diffusion.families import dit as dit_family


def caption_features(model, tokenizer, captions: list[str]) -> dict[str, np.ndarray]:
    """-> {"states": token states averaged over each caption's tokens (N, W), "pooled" (N, E),
    "words": word embeddings averaged likewise (N, W)}."""
    tokens, mask = tokenize(tokenizer, captions, model.config.context_length)
    cond = jax.jit(lambda t, m: dit_family.text_condition(model, t, m, words=True))(tokens, mask)
    weights = np.asarray(mask, np.float64)[..., None]

    def caption_mean(x):
        return (np.asarray(x, np.float64) * weights).sum(1) / weights.sum(1)

    return {
        "states": caption_mean(cond["context"]),
        "pooled": np.asarray(cond["pooled"], np.float64),
        "words": caption_mean(cond["words"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a CLIP run directory of train.py")
    parser.add_argument("--train", type=int, default=4000, help="train-split captions to fit on")
    parser.add_argument("--test", type=int, default=1000, help="test-split captions to score")
    args = parser.parse_args()

    model = rundir.load_text_encoder(args.run_dir, {"dtype": "float32"})
    tokenizer = load_tokenizer(os.path.join(args.run_dir, rundir.TOKENIZER_DIR))
    with open(os.path.join(args.run_dir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    train = evaluation.load_split_examples(config.data, config.seed, "train", args.train)
    test = evaluation.load_split_examples(config.data, config.seed, "test", args.test)
    fit = caption_features(model, tokenizer, train.captions)
    score = caption_features(model, tokenizer, test.captions)

    print(f"{len(train.captions)} train / {len(test.captions)} test captions of {args.run_dir}")
    print(
        "| attribute | probe: token states | probe: pooled | probe: words "
        "| pooled variance share | words variance share |"
    )
    print("|---|---|---|---|---|---|")
    for attribute in evaluation.ATTRIBUTES:
        y_train, y_test = train.labels[attribute], test.labels[attribute]
        probes = [
            evaluation.linear_probe_accuracy(fit[name], y_train, score[name], y_test)
            for name in ("states", "pooled", "words")
        ]
        shares = [
            evaluation.between_class_variance_share(fit[name], y_train)
            for name in ("pooled", "words")
        ]
        print(f"| {attribute} | " + " | ".join(f"{v:.3f}" for v in probes + shares) + " |")


if __name__ == "__main__":
    main()
