"""encode.py's job: every image of a TFDS dataset through a frozen autoencoder's encoder, into a
latent TFDS dataset that the same input pipeline reads (`diffusion.encoding.latent_dataset`).
A dataset of clips (T, H, W, C) is encoded frame by frame into latent clips (T, h, w, c), the
latents of a video DiT on a per-frame autoencoder.

The work is a fixed list of shards (split, examples [start, stop)). Process p of P encodes the
shards whose position in the list is p modulo P, each in batches spread over its local devices
(the autoencoder replicated, the batch split), and writes each shard whole; process 0 writes the
metadata once every process is done. The posterior (mean and std) is stored rather than one
sampled latent, so nothing here is random: a rerun after a kill skips the shards that exist and
ends with the bytes of an uninterrupted run. A stop request (SIGTERM through the caller's
PreemptionGuard) ends the job after the batch in flight (with several processes: after the round
of shards in flight, the same in all), dropping only an unfinished shard.
With `EncodeOptions.text_encoder`, each batch's captions also go through that frozen text tower
(`text_features`), in the same batches, so a record holds its caption's features too.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
import tqdm

from diffusion import distributed, rundir
from diffusion.data import latents, sources
from diffusion.encoding.latent_dataset import LatentDatasetWriter, Shard, latent_features
from diffusion.encoding.replicas import LocalReplicas
from diffusion.encoding.text_features import TextFeatureEncoder, captions_of
from diffusion.errors import UserError
from diffusion.models.autoencoder import Autoencoder, AutoencoderConfig
from diffusion.training import inputs


@dataclasses.dataclass(frozen=True)
class EncodeOptions:
    output_dir: str
    name: str | None = None  # dataset name; default "<source name>_latents"
    splits: tuple[str, ...] | None = None  # default: every split of the source
    batch_size: int = 64  # images (or clips) per call in each process (rounded up to its devices)
    examples_per_shard: int = 4096  # examples per output file: the unit of resumption
    # A CLIP run (or Hugging Face CLIP directory) whose text tower's features of each caption
    # are stored too (`text_features`); None: latents only.
    text_encoder: str | None = None
    text_words: bool = False  # with text_encoder: also the tower's word embeddings


class EncodingStopped(Exception):
    """`stop()` ended the job before every shard was written: the written ones are whole, the
    dataset is not marked complete, and the same command finishes it."""


def encode_dataset(
    autoencoder_path: str, data_config, seed: int, options: EncodeOptions, stop=lambda: False
) -> str:
    """Encodes every split of `data_config`'s dataset with the autoencoder at `autoencoder_path`
    (a run directory of family autoencoder, or a diffusers AutoencoderKL directory); returns the
    latent dataset's directory (OUTPUT_DIR/NAME/1.0.0). Resumes an interrupted run.

    stop(): asked after every round of shards (round r: each process's r-th shard) in every
    process alike, so that with several processes all stop after the same round (a
    PreemptionGuard's `poll`), and with one also before every batch; True raises
    EncodingStopped in every process, before any waits for a peer."""
    model, autoencoder_config = rundir.load_autoencoder(autoencoder_path)
    source, builder = inputs.prepare_source(data_config, seed)
    features = builder.info.features
    image_shape = check_images(features, source.image_key, autoencoder_config, source.name)
    splits = options.splits or tuple(builder.info.splits.keys())
    readers = {split: _reader(builder, source, split) for split in splits}
    f = autoencoder_config.downsampling_factor
    *frames, height, width, _ = image_shape
    latent_shape = (*frames, height // f, width // f, autoencoder_config.latent_channels)
    name = options.name or f"{sources.dataset_name(source.name)}_latents"
    text = None
    output_features = latent_features(features, source.image_key, latent_shape)
    if options.text_encoder:
        check_captions(features, source)
        text = TextFeatureEncoder(options.text_encoder, options.batch_size, options.text_words)
        output_features = tfds.features.FeaturesDict({**output_features, **text.features()})
    writer = LatentDatasetWriter(
        options.output_dir,
        name,
        output_features,
        {split: len(reader) for split, reader in readers.items()},
        options.examples_per_shard,
    )
    plan = dict(
        autoencoder=os.path.abspath(autoencoder_path),
        autoencoder_config=dataclasses.asdict(autoencoder_config),
        source=source.name,
        source_data_dir=os.path.abspath(data_config.data_dir) if data_config.data_dir else None,
        source_image_key=source.image_key,
        splits=writer.split_lengths,
        examples_per_shard=options.examples_per_shard,
        batch_size=options.batch_size,
        **(text.plan() if text is not None else {}),
    )
    if writer.is_complete():  # kept if it is what this plan asks for (else PlanChanged)
        writer.check_plan(plan)
        print(f"{writer.root} is complete; nothing to encode", flush=True)
        return writer.root
    if jax.process_index() == 0:
        writer.start(plan)
    distributed.barrier("latent dataset planned")
    shards = writer.shards()
    rounds = -(-len(shards) // jax.process_count())  # the same number in every process
    mine = shards[jax.process_index() :: jax.process_count()]
    encode = BatchEncoder(model, options.batch_size)
    captions = {}  # the captions of each split, as training makes them
    if text is not None:
        captions = {split: captions_of(reader, source) for split, reader in readers.items()}
    encoders = Encoders(encode, text, captions, source.image_key)
    _encode_shards(encoders, writer, readers, mine, rounds, stop)
    distributed.barrier("every shard of the latent dataset written")
    if jax.process_index() == 0:
        description = f"Posterior mean and std of {source.name} under {autoencoder_path}"
        writer.write_metadata(description)
        split = "train" if "train" in splits else splits[0]
        statistics = latent_statistics(writer.root, split)
        scale, shift, origin = latents.normalisation(
            statistics, autoencoder_config.scaling_factor, autoencoder_config.shift_factor
        )
        if text is not None:  # before encoding.json, which marks the dataset complete
            text.write_empty(writer.root)
        writer.finish(
            dict(
                plan,
                scaling_factor=scale,
                shift_factor=shift,
                normalisation=origin,
                statistics=dict(statistics, split=split),
                latent_shape=list(latent_shape),
                image_shape=list(image_shape),
                downsampling_factor=f,
            )
        )
    distributed.barrier("latent dataset finished")
    return writer.root


def check_images(
    features: Mapping[str, Any], image_key: str, config: AutoencoderConfig, dataset: str
) -> tuple[int, ...]:
    """The dataset's images (H, W, C) or clips (T, H, W, C), refused unless the autoencoder can
    encode them (a clip frame by frame)."""
    if image_key not in features:
        raise UserError(
            f"config.data.image_key={image_key!r} is not a feature of {dataset!r}; features: "
            f"{sorted(features)}"
        )
    shape = tuple(features[image_key].shape)
    if len(shape) not in (3, 4) or None in shape:
        raise UserError(
            f"{dataset!r} feature {image_key!r} has shape {shape}; encoding needs images "
            "(H, W, C) or clips (T, H, W, C) of one fixed size: resize the dataset when "
            "preparing it."
        )
    height, width, channels = shape[-3:]
    if channels != config.in_channels:
        raise UserError(
            f"{dataset!r} has {channels}-channel images but the autoencoder encodes "
            f"{config.in_channels} channels (in_channels); use an autoencoder trained on "
            f"{channels}-channel images."
        )
    f = config.downsampling_factor
    if height % f or width % f:
        raise UserError(
            f"{dataset!r} images are {height}x{width}, not a multiple of the autoencoder's "
            f"downsampling factor {f}; prepare the dataset at a size divisible by {f}."
        )
    return shape


def check_captions(features: Mapping[str, Any], source: sources.SourceConfig) -> None:
    """Refuses a dataset without the caption features (or template fields) the recipe names."""
    needed = sources.needed_keys(source, features, captions=True)
    missing = [key for key in needed if key not in features]
    if missing:
        raise UserError(
            f"--text_encoder encodes each record's caption, but {source.name!r} has no feature "
            f"{missing} (features: {sorted(features)}); set config.data.caption_key, or "
            "config.data.label_key and caption_template, to features it has."
        )


def _reader(builder, source: sources.SourceConfig, split: str) -> sources.RecordReader:
    sources.check_split(builder, split)
    return sources.RecordReader(builder, split, list(builder.info.features))


class BatchEncoder:
    """The encoder's posterior of uint8 batches of images, or of clips frame by frame, spread
    over this process's devices."""

    def __init__(self, model: Autoencoder, batch_size: int):
        def posterior(model, images):  # (B, [T,] H, W, C) uint8
            frames = images.reshape((-1,) + images.shape[-3:])
            mean, logvar = model.encode(frames.astype(jnp.float32) / 127.5 - 1.0)
            as_input = lambda x: x.reshape(images.shape[:-3] + x.shape[1:])
            return as_input(mean), as_input(jnp.exp(0.5 * logvar))  # (B, [T,] h, w, c) each

        self.program = LocalReplicas(model, posterior, 1, batch_size)
        self.batch_size = self.program.batch_size

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean, std = self.program(images)
        return mean.astype(np.float32), std.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Encoders:
    """What one batch of records goes through: the autoencoder, and the text tower (if any) of
    the captions that `captions[split]` makes."""

    images: BatchEncoder
    text: TextFeatureEncoder | None
    captions: Mapping[str, Any]
    image_key: str

    @property
    def batch_size(self) -> int:
        return self.images.batch_size


def _encode_shards(
    encode: Encoders, writer, readers, mine, rounds: int, stop=lambda: False
) -> None:
    """Round r writes this process's r-th shard of `mine` unless it is written already, then
    asks stop() (all processes run `rounds` rounds, so they ask it alike); one process also asks
    before every batch, as its answer needs no agreement."""
    total = sum(s.stop - s.start for s in mine if not writer.is_written(s))
    bar = tqdm.tqdm(total=total, unit="img", desc="encode", disable=jax.process_index() != 0)
    batch_stop = stop if jax.process_count() == 1 else (lambda: False)
    start, done = time.perf_counter(), 0
    try:
        for round_ in range(rounds):
            shard = mine[round_] if round_ < len(mine) else None
            if shard is not None and not writer.is_written(shard):
                examples = _encoded_examples(encode, readers[shard.split], shard, batch_stop)
                writer.write(shard, examples)
                done += shard.stop - shard.start
                bar.update(shard.stop - shard.start)
                bar.set_postfix(img_s=f"{done / (time.perf_counter() - start):.1f}")
            if round_ + 1 < rounds and stop():
                raise EncodingStopped(f"stopped after {round_ + 1} of {rounds} rounds of shards")
    finally:
        bar.close()


def _encoded_examples(encode: Encoders, reader, shard: Shard, stop=lambda: False) -> Iterator[dict]:
    image_key = encode.image_key
    for first in range(shard.start, shard.stop, encode.batch_size):
        if stop():
            raise EncodingStopped(f"stopped before example {first} of {shard.split!r}")
        indices = list(range(first, min(shard.stop, first + encode.batch_size)))
        records = reader.read(indices)
        images = np.stack([np.asarray(r[image_key], np.uint8) for r in records])
        means, stds = encode.images(images)
        texts = [{}] * len(records)
        if encode.text is not None:
            texts = encode.text([encode.captions[shard.split].caption(r) for r in records])
        for record, mean, std, text in zip(records, means, stds, texts, strict=True):
            kept = {k: v for k, v in record.items() if k != image_key}
            yield {**kept, latents.MEAN_KEY: mean, latents.STD_KEY: std, **text}


def latent_statistics(root: str, split: str, limit: int = 65_536) -> dict[str, float]:
    """Mean and std of the posterior draws of the first `limit` examples of a written split."""
    reader = sources.RecordReader(
        tfds.builder_from_directory(root), split, [latents.MEAN_KEY, latents.STD_KEY]
    )
    statistics = latents.LatentStatistics()
    count = min(len(reader), limit)
    for start in range(0, count, 1024):
        records = reader.read(range(start, min(count, start + 1024)))
        statistics.add(
            np.stack([r[latents.MEAN_KEY] for r in records]),
            np.stack([r[latents.STD_KEY] for r in records]),
        )
    return statistics.result()
