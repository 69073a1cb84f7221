"""Input pipeline: a TFDS image or clip dataset -> grain -> per-process batches -> jax.Arrays.

The records come from `diffusion.data.sources` (any TFDS image dataset prepared as array_record);
this module decodes them into model inputs, batches them and shards each batch over processes.

Why a grain `MapDataset` of index batches rather than `grain.DataLoader`: the DataLoader reads
one record per call, and array_record's per-call cost (~280 us here, it sets up a zstd
decompressor each time) would cap the input pipeline near 1.5k examples/s on this machine. Batching
the record indices first and reading each batch with one `__getitems__` call costs ~4 us per
record. The iterator is still grain's checkpointable `DatasetIterator` (`get_state` /
`set_state`), and since every step of the graph is random access its state is just a position.

Order of operations, the same on every process:
  all record indices of the split (with config.data.where, those it keeps)
  -> shuffle (grain's index shuffle, reseeded every epoch: seed + epoch)
  -> repeat num_epochs (None: forever; batches then run across epoch boundaries)
  -> batch of global_batch_size indices, remainder dropped (with hard negatives: half as many
     anchors, each followed by its twin, see `TwinFinder`)
  -> this process's rows of the global batch (process p owns rows [p b, (p + 1) b))
  -> batched read + decode -> images to [-1, 1] NHWC float32 (clips: NTHWC), captions -> token
     ids and mask
     (with hard negative captions, also each caption with one attribute's word swapped, see
     `swap_attribute_word`).

Why shard each global batch rather than the records: the global batch (the concatenation of the
processes' rows, which is what `to_global_batch` assembles) is then the same whatever the number
of processes, so a run on 2 hosts x 4 devices trains on exactly the batches of 1 host x 8
devices, and a checkpoint's iterator position means the same thing on any host count. Each
process still reads and decodes only its own rows; over an epoch their rows are disjoint and
cover the split.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
import transformers
from absl import flags

from diffusion.data.classes import ClassSpace
from diffusion.data.latents import STD_KEY
from diffusion.data.selection import selected_records
from diffusion.data.sources import (
    DEFAULT_CAPTION_TEMPLATE,
    RecordReader,
    SourceConfig,
    class_label_keys,
    dataset_builder,
    label_columns,
    open_source,
    template_fields,
)
from diffusion.data.tokenizer import tokenize
from diffusion.errors import UserError

DEFAULT_BATCH_AXES = ("data", "fsdp")
LATENT_DRAWS = 1  # the stream of posterior draws, apart from that of negative captions


# ---------------------------------------------------------------------------------------------
# Decoding a batch
# ---------------------------------------------------------------------------------------------


def _as_text(value: Any) -> str:
    value = value.item() if isinstance(value, np.ndarray) else value
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def swap_attribute_word(caption: str, word: str, replacement: str) -> str:
    """`caption` with the first whole-word occurrence of `word` replaced by `replacement`.

    The first, because an attribute's own word comes before any other use of the same word in
    the shapes captions ("a white star on a white background": colour, then background).
    """
    swapped, count = re.subn(rf"\b{re.escape(word)}\b", replacement, caption, count=1)
    if not count:
        raise UserError(
            f"Hard negative captions swap an attribute's word, but {word!r} is not a word of "
            f"the caption {caption!r}; use attributes whose ClassLabel names appear verbatim "
            "in the captions (config.loss.negative_caption_attributes)"
        )
    return swapped


@dataclasses.dataclass
class BatchDecoder:
    """Reads a batch of record indices in one call and turns it into model inputs."""

    reader: RecordReader
    config: SourceConfig
    tokenizer: transformers.PreTrainedTokenizerBase | None
    context_length: int
    negative_caption_attributes: tuple[str, ...] = ()
    seed: int = 0
    captions: bool = True  # False: no 'tokens' / 'mask' (a class-conditional model reads none)
    classes: ClassSpace | None = None  # with it, 'label': the class id of each record

    def __post_init__(self):
        self.features = self.reader.features
        self.label_keys = class_label_keys(self.features)
        unknown = [a for a in self.negative_caption_attributes if a not in self.label_keys]
        if unknown:
            raise UserError(
                f"Hard negative caption attribute(s) {unknown} are not ClassLabel features of "
                f"{self.config.name!r}; valid: {self.label_keys}"
            )
        self.template = None
        if self.config.caption_template is not None or self.config.label_key is not None:
            self.template = self.config.caption_template or DEFAULT_CAPTION_TEMPLATE

    def _field_text(self, record: Mapping[str, Any], field: str) -> str:
        key = self.config.label_key if field == "label" and self.config.label_key else field
        feature = self.features[key]
        if isinstance(feature, tfds.features.ClassLabel):
            return feature.int2str(int(record[key]))
        return _as_text(record[key])

    def caption(self, record: Mapping[str, Any]) -> str:
        if self.template is None:
            return _as_text(record[self.config.caption_key])
        fields = {f: self._field_text(record, f) for f in template_fields(self.template)}
        return self.template.format(**fields)

    def negative_captions(
        self, records: Sequence[Mapping[str, Any]], captions: Sequence[str], indices: np.ndarray
    ) -> list[str]:
        """Each caption with one of `negative_caption_attributes` (drawn per record) swapped to
        another of its values: NegCLIP's hard negatives (Yuksekgonul et al. 2023). The draw
        depends only on the seed and the indices, so a resumed run sees the same negatives."""
        rng = np.random.default_rng([self.seed, *(int(i) for i in indices)])
        negatives = []
        for record, caption in zip(records, captions, strict=True):
            attribute = self.negative_caption_attributes[
                int(rng.integers(len(self.negative_caption_attributes)))
            ]
            names = self.features[attribute].names
            own = int(record[attribute])
            other = (own + 1 + int(rng.integers(len(names) - 1))) % len(names)
            negatives.append(swap_attribute_word(caption, names[own], names[other]))
        return negatives

    @functools.cached_property
    def input_key(self) -> str:
        """The batch key of the model input: 'video' for a dataset of clips, else 'image'."""
        return input_key_of(self.features[self.config.image_key])

    def images(self, records: Sequence[Mapping[str, Any]], indices: np.ndarray) -> np.ndarray:
        """uint8 images -> float32 (b, H, W, 3) in [-1, 1], uint8 clips -> float32
        (b, T, H, W, 3) scaled alike; the posteriors of an encoded dataset
        -> a normalised draw from each (`LatentEncoding.model_inputs`, seeded by the seed and
        the batch's indices, so that a resumed run draws the same); other float features (any
        channel count) -> float32 as stored."""
        images = np.stack([np.asarray(r[self.config.image_key]) for r in records])
        if self.config.latents is not None:
            stds = np.stack([np.asarray(r[STD_KEY]) for r in records])
            rng = np.random.default_rng([self.seed, LATENT_DRAWS, *(int(i) for i in indices)])
            return self.config.latents.model_inputs(images, stds, rng)  # (b, [T,] h, w, c)
        if np.issubdtype(images.dtype, np.floating) and images.ndim == 4:
            return images.astype(np.float32)  # (b, h, w, c)
        if images.ndim not in (4, 5) or images.shape[-1] not in (1, 3):
            raise UserError(
                f"Expected (H, W, 1 or 3) images or (T, H, W, 1 or 3) clips in "
                f"{self.config.image_key!r}, got a batch of shape {images.shape}"
            )
        if images.shape[-1] == 1:  # grayscale datasets (e.g. mnist) as RGB
            images = np.repeat(images, 3, axis=-1)
        return images.astype(np.float32) / 127.5 - 1.0  # (b[, T], H, W, 3) in [-1, 1]

    def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        records = self.reader.read([int(i) for i in indices])
        batch = {self.input_key: self.images(records, indices)}
        if self.captions:
            captions = [self.caption(r) for r in records]
            # (b, L) int32 token ids, and the mask: 1 on real tokens
            batch["tokens"], batch["mask"] = tokenize(self.tokenizer, captions, self.context_length)
            latents = self.config.latents
            for key in latents.text_keys if latents is not None else ():  # cached, as stored
                batch[key] = np.stack([np.asarray(r[key]) for r in records])
        if self.negative_caption_attributes:
            negatives = self.negative_captions(records, captions, indices)
            batch["negative_caption_tokens"], batch["negative_caption_mask"] = tokenize(
                self.tokenizer, negatives, self.context_length
            )
        for key in self.label_keys:
            batch[key] = np.array([int(r[key]) for r in records], np.int32)  # (b,)
        if self.classes is not None:
            batch["label"] = self.classes.ids(batch)  # (b,) int32 class ids
        return batch


def input_key_of(feature: Any) -> str:
    """'video' for a (T, H, W, C) clip feature (uint8 clips, or the latent clips of an encoded
    dataset), 'image' for an (H, W, C) one (images and their latents), as the batches name the
    model input."""
    return "video" if len(getattr(feature, "shape", ())) == 4 else "image"


# ---------------------------------------------------------------------------------------------
# Hard negatives: batches of twins that differ in one attribute only
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TwinFinder:
    """Pairs each record with a twin whose ClassLabels equal its own but for one attribute.

    Why: in a contrastive batch of random captioned shapes almost every pair already differs in
    colour, size, position or background, so the loss is low without ever looking at the shape
    and CLIP stays at chance on it. A twin that differs only in `attribute` is a hard negative
    (as in NegCLIP, Yuksekgonul et al. 2023) that only that attribute tells apart.
    """

    labels: np.ndarray  # (N, K) int: the ClassLabels of every record, columns as `label_keys`
    label_keys: tuple[str, ...]
    attributes: tuple[str, ...]  # the attributes a twin may differ in (one drawn per pair)
    seed: int

    @classmethod
    def from_source(
        cls, config: SourceConfig, split: str, attributes: Sequence[str], seed: int
    ) -> TwinFinder:
        builder = dataset_builder(config)
        label_keys = tuple(class_label_keys(builder.info.features))
        unknown = [a for a in attributes if a not in label_keys]
        if unknown:
            raise UserError(
                f"Hard-negative attribute(s) {unknown} are not ClassLabel features of "
                f"{config.name!r}; valid: {list(label_keys)}"
            )
        labels = label_columns(builder, split, label_keys)
        return cls(labels, label_keys, tuple(attributes), seed)

    def _groups(self, column: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Records sorted by all labels but `column`: (group of each record, order, starts,
        counts), so order[starts[g]:starts[g] + counts[g]] are the records of group g."""
        others = np.delete(self.labels, column, axis=1)
        _, group, counts = np.unique(others, axis=0, return_inverse=True, return_counts=True)
        group = group.reshape(-1)
        order = np.argsort(group, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        return group, order, starts, counts

    @functools.cached_property
    def _group_tables(self) -> list[tuple[np.ndarray, ...]]:
        return [self._groups(self.label_keys.index(a)) for a in self.attributes]

    def __call__(self, anchors: np.ndarray) -> np.ndarray:
        """(2 n,) indices: each anchor followed by its twin. The twin depends only on the seed
        and the anchors, so a resumed run draws the same twins."""
        rng = np.random.default_rng([self.seed, *(int(a) for a in anchors)])
        twins = np.empty_like(anchors)
        for row, anchor in enumerate(anchors):
            which = int(rng.integers(len(self.attributes)))
            column = self.label_keys.index(self.attributes[which])
            group, order, starts, counts = self._group_tables[which]
            g = group[anchor]
            members = order[starts[g] : starts[g] + counts[g]]
            candidates = members[self.labels[members, column] != self.labels[anchor, column]]
            if len(candidates):
                twins[row] = rng.choice(candidates)
            else:  # no twin exists (a lone combination): any other record is still a negative
                twins[row] = (anchor + 1 + rng.integers(len(group) - 1)) % len(group)
        return np.stack([anchors, twins], axis=1).reshape(-1)


# ---------------------------------------------------------------------------------------------
# The input pipeline
# ---------------------------------------------------------------------------------------------


def make_input_pipeline(
    source_config: SourceConfig,
    tokenizer: transformers.PreTrainedTokenizerBase,
    *,
    split: str,
    global_batch_size: int,
    seed: int,
    context_length: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    read_threads: int = 2,
    hard_negative_attributes: Sequence[str] = (),
    negative_caption_attributes: Sequence[str] = (),
    captions: bool = True,
    class_features: Sequence[str] = (),
) -> grain.DatasetIterator:
    """A checkpointable iterator of this process's batches (see the module docstring).

    Each batch is a dict of numpy arrays: 'image' float32 (b, H, W, 3) in [-1, 1] (a dataset
    of clips: 'video' float32 (b, T, H, W, 3) instead, scaled alike), 'tokens'
    int32 (b, L), 'mask' int32 (b, L), and one int32 (b,) field per ClassLabel feature, with
    b = global_batch_size / process_count. `iterator.get_state()` / `set_state(state)` save and
    restore the position, so a resumed run sees exactly the batches of an uninterrupted one.
    `worker_count` > 0 decodes in that many worker processes (grain `mp_prefetch`); the same
    batches come out, but the state format differs, so resume with the same worker_count.
    `hard_negative_attributes` (ClassLabel names, e.g. ("shape",)): every even row of the global
    batch is a shuffled record and the row after it its twin differing only in one of these
    attributes (`TwinFinder`); an epoch then covers each record once as an anchor.
    `negative_caption_attributes` (ClassLabel names whose words appear in the captions): each
    batch also holds 'negative_caption_tokens' and 'negative_caption_mask', every caption with
    one of these attributes' words swapped for another value (NegCLIP), for the contrastive loss.
    `captions=False`: no captions are read and no 'tokens' / 'mask' made (`tokenizer` may be
    None). A dataset with cached text features (`diffusion.data.latents.text_keys`) adds them
    to each batch beside 'tokens' and 'mask'. `class_features` (ClassLabel names,
    `diffusion.data.classes`): each batch also holds 'label', the int32 class id of each
    record (mixed radix over these features). `source_config.where` (`diffusion.data.selection`)
    keeps only the records whose ClassLabels it names: epochs then range over those alone.

    Every process yields the same number of batches; the global batch does not depend on the
    number of processes.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise UserError(
            f"global_batch_size {global_batch_size} is not divisible by process_count "
            f"{process_count}; use a multiple of {process_count}"
        )
    local_batch_size = global_batch_size // process_count
    if not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} not in [0, {process_count})")
    reader = open_source(source_config, split, captions=captions)
    selected = selected_records(source_config, split)  # None: no filter, every record
    num_records = len(reader) if selected is None else len(selected)
    if (num_epochs or 1) * num_records < global_batch_size:
        kept = "" if selected is None else f" kept by where={source_config.where!r}"
        raise UserError(
            f"{num_epochs or 1} epoch(s) of the {num_records} records{kept} of split {split!r} "
            f"cannot fill one batch of {global_batch_size}; lower the batch size or raise "
            "num_epochs"
        )
    if hard_negative_attributes and selected is not None:
        # A twin is drawn from the whole split and could break the filter.
        raise UserError(
            f"Hard negatives (config.loss.hard_negative_attributes) are not supported with a "
            f"record filter (config.data.where={source_config.where!r}); drop one of them"
        )
    if hard_negative_attributes and global_batch_size % (2 * process_count):
        raise UserError(
            f"Hard negatives pair up rows, so global_batch_size {global_batch_size} must be a "
            f"multiple of 2 x process_count = {2 * process_count}"
        )
    classes = None
    if class_features:
        classes = ClassSpace.from_features(reader.features, class_features, source_config.name)
    decoder = BatchDecoder(
        reader,
        source_config,
        tokenizer,
        context_length,
        tuple(negative_caption_attributes),
        seed,
        captions=captions,
        classes=classes,
    )
    if negative_caption_attributes:
        decoder(np.arange(1))  # a caption without the words fails here, not in a grain thread
    own_rows = slice(process_index * local_batch_size, (process_index + 1) * local_batch_size)

    # Positions in the list of kept records, so shuffling and the iterator state stay index
    # based (the same config gives the same batches, and a resumed run continues them).
    if selected is None:
        dataset = grain.MapDataset.range(len(reader))
    else:
        dataset = grain.MapDataset.source(selected)
    if shuffle:
        dataset = dataset.shuffle(seed=seed % 2**32)
    dataset = dataset.repeat(num_epochs)
    if hard_negative_attributes:
        twins = TwinFinder.from_source(source_config, split, hard_negative_attributes, seed)
        dataset = dataset.batch(global_batch_size // 2, drop_remainder=True).map(twins)
    else:
        dataset = dataset.batch(global_batch_size, drop_remainder=True)
    dataset = dataset.map(lambda indices: indices[own_rows])  # (b,) this process's rows
    dataset = dataset.map(decoder)
    read_options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4)
    iter_dataset = dataset.to_iter_dataset(read_options)
    if worker_count > 0:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; scripts may not use absl
            flags.FLAGS.mark_as_parsed()
        iter_dataset = iter_dataset.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_count)
        )
    return iter(iter_dataset)


def to_global_batch(
    local_batch: Mapping[str, np.ndarray],
    mesh: jax.sharding.Mesh,
    partition_spec: jax.sharding.PartitionSpec | None = None,
) -> dict[str, jax.Array]:
    """Assembles each process's local batch into global jax.Arrays sharded along the batch.

    The leading (batch) dimension is split over `partition_spec` (default: the mesh's 'data'
    and 'fsdp' axes); the other dimensions are replicated. Global batch = concatenation of the
    local batches in process order.
    """
    if partition_spec is None:
        axes = tuple(a for a in DEFAULT_BATCH_AXES if a in mesh.axis_names)
        if not axes:
            raise UserError(
                f"Mesh axes {mesh.axis_names} contain none of {DEFAULT_BATCH_AXES}; "
                "pass partition_spec explicitly"
            )
        partition_spec = jax.sharding.PartitionSpec(axes)
    sharding = jax.sharding.NamedSharding(mesh, partition_spec)
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in local_batch.items()
    }
