"""Held-out examples of a run's dataset: images, captions, (for shapes) attribute labels and
(for a labelled dataset) class ids."""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from diffusion.data import input_pipeline, selection, sources
from diffusion.data.classes import ClassSpace, class_features_of
from diffusion.errors import UserError
from diffusion.evaluation.shapes_oracle import ATTRIBUTES
from diffusion.evaluation.video_oracle import ATTRIBUTES as VIDEO_ATTRIBUTES
from diffusion.training.inputs import prepare_source


@dataclasses.dataclass(frozen=True)
class SplitExamples:
    """The first N examples of a split: images, captions and (for shapes) attribute labels."""

    images: np.ndarray  # (N, S, S, 3) uint8; clips (N, T, S, S, 3) of a dataset of clips
    captions: list[str]
    # attribute -> (N,) int: shapes' (shape_oracle.ATTRIBUTES) or moving_shapes'
    # (video_oracle.ATTRIBUTES); empty when the dataset has neither
    labels: dict[str, np.ndarray]
    classes: ClassSpace | None = None  # the dataset's classes (`class_space_of`), if any
    class_ids: np.ndarray | None = None  # (N,) int32 class id of each example, with classes


def load_split_examples(
    data_config, seed: int, split: str, count: int, source_data_dir: str | None = None
) -> SplitExamples:
    """Reads `count` examples (fewer if the split is smaller) in record order, building the
    shapes dataset first if it is missing (the same call as training). With a record filter
    (data_config.where), the first `count` records it keeps, as training kept them. A latent
    dataset's examples are the images it was encoded from: under `source_data_dir` if given
    (they moved), else where its encoding.json says."""
    source, _ = prepare_source(data_config, seed)
    if source.latents is not None:  # the images encoded, in the latent dataset's record order
        source = images_of(source, source_data_dir)
    reader = sources.open_source(source, split)
    decoder = input_pipeline.BatchDecoder(reader, source, tokenizer=None, context_length=2)
    selected = selection.selected_records(source, split)  # None: no filter
    indices = range(len(reader)) if selected is None else selected
    records = reader.read([int(i) for i in indices[:count]])
    images = np.stack([np.asarray(r[source.image_key], np.uint8) for r in records])
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    labels = {}
    for attributes in (ATTRIBUTES, VIDEO_ATTRIBUTES):
        if all(a in reader.features for a in attributes):
            labels = {a: np.array([int(r[a]) for r in records]) for a in attributes}
            break
    captions = [decoder.caption(r) for r in records]
    classes = class_space_of(data_config, reader.features, source.name)
    if classes is None:
        return SplitExamples(images, captions, labels)
    class_labels = {f: np.array([int(r[f]) for r in records]) for f in classes.features}
    return SplitExamples(images, captions, labels, classes, classes.ids(class_labels))


def class_space_of(data_config, features, dataset: str) -> ClassSpace | None:
    """The classes of a labelled dataset: the recipe's class features (class_features, else
    label_key); without them, the dataset's only scalar ClassLabel; else None (e.g. shapes,
    whose several attributes have their own zero-shot metrics)."""
    keys = class_features_of(data_config)
    if not keys:
        labels = [
            k
            for k, f in features.items()
            if isinstance(f, tfds.features.ClassLabel) and not f.shape
        ]
        if len(labels) != 1:
            return None
        keys = tuple(labels)
    return ClassSpace.from_features(features, keys, dataset)


def images_of(
    source: sources.SourceConfig, source_data_dir: str | None = None
) -> sources.SourceConfig:
    """The image dataset that a latent dataset was encoded from (captions and labels are the
    same record for record), under `source_data_dir` if given, else where it was encoded."""
    latents = source.latents
    if latents.source is None:
        raise UserError(
            f"{source.name!r} does not record the image dataset it was encoded from; encode it "
            "again with this version of encode.py to evaluate models trained on it."
        )
    images = dataclasses.replace(
        source,
        name=latents.source,
        data_dir=source_data_dir or latents.source_data_dir,
        image_key=latents.source_image_key,
        latents=None,
    )
    if not sources.dataset_builder(images).is_prepared():
        raise UserError(
            f"{source.name!r} holds latents of {latents.source!r}, whose images are not under "
            f"{images.data_dir!r} (the source_data_dir its encoding.json records, or the one "
            "given); pass evaluate.py --source_data_dir=DIR where that dataset is now."
        )
    return images
