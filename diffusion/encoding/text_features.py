"""encode.py --text_encoder: each caption's features under a frozen CLIP text tower, stored beside
its latents so that a text-conditional DiT trains without running the tower in its step.

The features are those the DiT's train step computes (`families.dit.text_condition`, the same
function): token states, the token mask, the pooled embedding and, with `words`, the tower's
input-layer word embeddings; float32 whatever the dtype of a Hugging Face tower in training. The
empty caption's features (what condition dropout swaps in) are stored once, in
`latents.EMPTY_TEXT_FILE`.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np
import tensorflow_datasets as tfds

from diffusion import data as data_lib
from diffusion import rundir
from diffusion.data import input_pipeline, latents
from diffusion.encoding.replicas import LocalReplicas
from diffusion.families import dit


class TextFeatureEncoder:
    """Captions -> their text features, in batches spread over this process's devices (the tower
    replicated, the batch split), as `job.BatchEncoder` encodes images."""

    def __init__(self, checkpoint: str, batch_size: int, words: bool):
        model = rundir.load_text_encoder(checkpoint, {"dtype": "float32"})
        self.checkpoint = os.path.abspath(checkpoint)
        # A CLIP run trained further keeps its path but makes other features: its step tells the
        # plans apart, so a rerun refuses the features of the earlier weights (None: a Hugging
        # Face directory, whose weights do not move).
        self.step = rundir.latest_step(checkpoint)
        self.tokenizer_path, self.context_length = rundir.text_encoder_tokenizer(checkpoint)
        self.tokenizer = data_lib.load_tokenizer(self.tokenizer_path)
        self.words = words
        self.config = model.config

        def features(model, tokens, mask):  # (B, L) int32 each
            cond = dit.text_condition(model, tokens, mask, words=words)
            named = {
                latents.TEXT_CONTEXT_KEY: cond["context"],  # (B, L, D)
                latents.TEXT_MASK_KEY: cond["context_mask"],  # (B, L)
                latents.TEXT_POOLED_KEY: cond["pooled"],  # (B, E)
            }
            if words:
                named[latents.TEXT_WORDS_KEY] = cond["words"]  # (B, L, W)
            return named

        self.program = LocalReplicas(model, features, 2, batch_size)
        self.batch_size = self.program.batch_size

    def plan(self) -> dict:
        """What plan.json and encoding.json record of the text features."""
        return dict(
            text_encoder=self.checkpoint,
            text_encoder_step=self.step,
            text_tokenizer=self.tokenizer_path,
            text_context_length=self.context_length,
            text_words=self.words,
            text_vocabulary=data_lib.vocabulary_digest(self.tokenizer),
        )

    def features(self) -> dict[str, tfds.features.Tensor]:
        """The TFDS features of a record's text features."""
        c = self.config
        shapes = latents.text_feature_shapes(
            self.context_length, c.text_width, c.embed_dim, self.words
        )
        return {
            key: tfds.features.Tensor(
                shape=shape, dtype=dtype, encoding=tfds.features.Encoding.BYTES
            )
            for key, (shape, dtype) in shapes.items()
        }

    def __call__(self, captions: list[str]) -> list[dict[str, np.ndarray]]:
        """The features of each caption (at most batch_size of them)."""
        tokens, mask = data_lib.tokenize(self.tokenizer, captions, self.context_length)
        count = len(captions)
        named = self.program(tokens, mask)
        dtypes = {key: feature.np_dtype for key, feature in self.features().items()}
        return [
            {key: np.asarray(value[row], dtypes[key]) for key, value in named.items()}
            for row in range(count)
        ]

    def write_empty(self, dataset_dir: str) -> None:
        """The empty caption's features, to EMPTY_TEXT_FILE (a temporary renamed when whole).

        An .npz as np.savez writes it but for a fixed time stamp on each member (np.savez stamps
        the current time), so that a resumed job writes the bytes of an uninterrupted one."""
        (empty,) = self([""])
        path = os.path.join(dataset_dir, latents.EMPTY_TEXT_FILE)
        temporary = os.path.join(dataset_dir, "." + latents.EMPTY_TEXT_FILE + ".tmp")
        with open(temporary, "wb") as f:
            with zipfile.ZipFile(f, "w") as archive:
                for key, value in empty.items():
                    member = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                    with archive.open(member, "w") as out:
                        np.lib.format.write_array(out, value, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)


def captions_of(reader, source) -> input_pipeline.BatchDecoder:
    """The decoder whose `caption(record)` makes each record's caption as training makes it."""
    return input_pipeline.BatchDecoder(reader, source, tokenizer=None, context_length=2)
