"""Input pipeline: a TFDS image dataset -> grain -> per-process batches -> global jax.Arrays.

Any TFDS image dataset prepared as array_record can be read (`SourceConfig`), captions come
either from a text feature or from a template over the features ("a photo of a {label}").

Why a grain `MapDataset` of index batches rather than `grain.DataLoader`: the DataLoader reads
one record per call, and array_record's per-call cost (~280 us here, it sets up a zstd
decompressor each time) would cap the pipeline near 1.5k examples/s on this machine. Batching
the record indices first and reading each batch with one `__getitems__` call costs ~4 us per
record. The iterator is still grain's checkpointable `DatasetIterator` (`get_state` /
`set_state`), and since every step of the graph is random access its state is just a position.

Order of operations, the same on every process:
  all record indices of the split
  -> shuffle (grain's index shuffle, reseeded every epoch: seed + epoch)
  -> repeat num_epochs (None: forever; batches then run across epoch boundaries)
  -> batch of global_batch_size indices, remainder dropped (with hard negatives: half as many
     anchors, each followed by its twin, see `TwinFinder`)
  -> this process's rows of the global batch (process p owns rows [p b, (p + 1) b))
  -> batched read + decode -> images to [-1, 1] NHWC float32, captions -> token ids and mask
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

import contextlib
import dataclasses
import difflib
import functools
import os
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
import transformers
from absl import flags
from tensorflow_datasets.proto import tf_example_pb2

from diffusion.data import shapes as shapes_lib
from diffusion.data.tokenizer import tokenize
from diffusion.errors import UserError

DEFAULT_CAPTION_TEMPLATE = "a photo of a {label}"
DEFAULT_BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """Which TFDS dataset to read and how to get an image and a caption from each record."""

    name: str = "shapes"  # TFDS name, optionally "name/config:version", e.g. "shapes/32"
    data_dir: str | None = None  # TFDS data_dir; None uses TFDS's default (~/tensorflow_datasets)
    image_key: str = "image"  # uint8 image feature (H, W, 1 or 3)
    caption_key: str | None = "caption"  # text feature; used when both fields below are None
    label_key: str | None = None  # ClassLabel whose name fills {label} in caption_template
    caption_template: str | None = None  # e.g. "a {size} {label}"; default "a photo of a {label}"


# ---------------------------------------------------------------------------------------------
# Opening a dataset, with errors that say what would be valid
# ---------------------------------------------------------------------------------------------


def _dataset_name(name: str) -> str:
    return name.split("/")[0].split(":")[0]


def _builder(config: SourceConfig) -> tfds.core.DatasetBuilder:
    known = tfds.list_builders(with_community_datasets=False)
    base = _dataset_name(config.name)
    if base not in known:
        close = difflib.get_close_matches(base, known, n=5)
        raise UserError(
            f"Unknown TFDS dataset {base!r} (from name={config.name!r}). "
            f"Close matches: {close or 'none'}. The {len(known)} registered names are listed by "
            "tfds.list_builders(with_community_datasets=False); 'shapes' is the embedded one."
        )
    return tfds.builder(config.name, data_dir=config.data_dir)


def _split_names(split: str) -> list[str]:
    """Base split names in a TFDS split expression such as 'train[:90%]+test'."""
    return [re.split(r"[\[(]", part)[0].strip() for part in split.split("+")]


def _check_split(builder: tfds.core.DatasetBuilder, split: str) -> None:
    available = list(builder.info.splits.keys())
    if not available:  # unknown before preparation (or under tfds.testing.mock_data)
        return
    for name in _split_names(split):
        if name not in available:
            raise UserError(
                f"Split {name!r} (from split={split!r}) is not in dataset "
                f"{builder.info.full_name!r}; available splits: {available}"
            )


def template_fields(template: str) -> list[str]:
    """Names of the placeholders in a caption template, in order."""
    return [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]


def _check_features(config: SourceConfig, features: Mapping[str, Any]) -> None:
    available = sorted(features)

    def require(key: str, role: str) -> None:
        if key not in features:
            raise UserError(f"{role} {key!r} is not a feature of {config.name!r}; {available}")

    require(config.image_key, "image_key")
    if config.caption_template is None and config.label_key is None:
        if config.caption_key is None:
            raise UserError("Give caption_key, or label_key and/or caption_template")
        require(config.caption_key, "caption_key")
        return
    if config.label_key is not None:
        require(config.label_key, "label_key")
        if not isinstance(features[config.label_key], tfds.features.ClassLabel):
            raise UserError(f"label_key {config.label_key!r} is not a ClassLabel feature")
    for field in template_fields(config.caption_template or DEFAULT_CAPTION_TEMPLATE):
        if field == "label" and config.label_key is not None:
            continue
        if field not in features:
            raise UserError(
                f"caption_template {config.caption_template!r} names field {field!r}, which is "
                f"not a feature of {config.name!r}. Available fields: {available}"
                + ("" if config.label_key else "; {label} needs label_key")
            )


def open_source(config: SourceConfig, split: str) -> RecordReader:
    """A batched reader of one split, after checking the name, split and feature keys."""
    builder = _builder(config)
    _check_split(builder, split)
    features = builder.info.features
    _check_features(config, features)
    try:
        # `builder.as_data_source` rather than `tfds.data_source`, which may miss a local
        # dataset that the builder finds (tfds#5665).
        return RecordReader(builder, split, needed_keys(config, features))
    except (NotImplementedError, FileNotFoundError, AssertionError, KeyError) as error:
        if builder.is_prepared():
            raise
        hint = (
            "build_dataset(...)"
            if _dataset_name(config.name) == "shapes"
            else "download_and_prepare(file_format='array_record') where it has network access"
        )
        raise UserError(
            f"Dataset {config.name!r} is not prepared under data_dir={config.data_dir!r}; "
            f"run {hint} first (nothing is downloaded at run time)."
        ) from error


def build_dataset(
    name: str = "shapes",
    data_dir: str | None = None,
    resolution: int = 32,
    *,
    num_train: int = shapes_lib.DEFAULT_NUM_EXAMPLES["train"],
    num_test: int = shapes_lib.DEFAULT_NUM_EXAMPLES["test"],
    num_test_unseen: int = shapes_lib.DEFAULT_NUM_EXAMPLES["test_unseen"],
    seed: int = 0,
) -> tfds.core.DatasetBuilder:
    """Prepares the embedded shapes dataset if missing (offline) and returns its builder; any
    other name must already be prepared under data_dir. `tfds_name(builder)` gives the name
    for `SourceConfig` (e.g. "shapes/32")."""
    if _dataset_name(name) != "shapes":
        builder = _builder(SourceConfig(name=name, data_dir=data_dir))
        if not builder.is_prepared():
            raise UserError(
                f"Dataset {name!r} is not prepared under data_dir={data_dir!r}; only 'shapes' "
                "is generated here (nothing is downloaded at run time)."
            )
        return builder
    config = shapes_lib.shapes_config(
        resolution,
        num_train=num_train,
        num_test=num_test,
        num_test_unseen=num_test_unseen,
        seed=seed,
    )
    try:
        builder = tfds.builder("shapes", config=config, data_dir=data_dir)
        builder.download_and_prepare()
    except OSError as error:  # e.g. data_dir is a file, or not writable
        raise UserError(
            f"Cannot prepare the shapes dataset under data_dir={data_dir!r}: {error}. Point "
            "config.data.data_dir (evaluate.py: --data_dir) at a writable directory."
        ) from error
    return builder


def tfds_name(builder: tfds.core.DatasetBuilder) -> str:
    """The "name/config:version" string that `tfds.builder` (and SourceConfig.name) accepts."""
    config = f"/{builder.builder_config.name}" if builder.builder_config else ""
    return f"{builder.name}{config}:{builder.version}"


# ---------------------------------------------------------------------------------------------
# Decoding a batch
# ---------------------------------------------------------------------------------------------


def _as_text(value: Any) -> str:
    value = value.item() if isinstance(value, np.ndarray) else value
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _label_keys(features: Mapping[str, Any]) -> list[str]:
    """The scalar ClassLabel features; the pipeline passes them on as int32 fields."""
    return sorted(
        key
        for key, feature in features.items()
        if isinstance(feature, tfds.features.ClassLabel) and not feature.shape
    )


def _has_batched_reads(source: Any) -> bool:
    # tfds.testing.mock_data installs a `__getitems__` that fails with a TypeError (it binds the
    # mock generator but not `self`); real array_record sources read batches fine.
    try:
        source.__getitems__([0])
    except TypeError:
        return False
    return True


class RecordReader:
    """Reads batches of records of one split as dicts of the top-level features `keys`.

    Fast path: the raw records of a batch in one array_record call, parsed as tf.train.Example
    protos and decoded feature by feature with TFDS's own decoders: ~10x cheaper than TFDS's
    generic deserialisation, which walks every feature of every record in Python. It is taken
    when every needed feature is serialized as a scalar (Text, ClassLabel, Image,
    Tensor(encoding=BYTES)); other datasets, and mocked ones, use the source's own decoding.
    """

    def __init__(self, builder: tfds.core.DatasetBuilder, split: str, keys: Sequence[str]):
        self.features = builder.info.features
        self.keys = tuple(keys)
        self.builder, self.split = builder, split
        with self._naming_damaged_shards():
            self.source = builder.as_data_source(split=split)
            self.raw_source = self._raw_source(builder, split)
            self.batched_reads = _has_batched_reads(self.source)

    def _raw_source(self, builder: tfds.core.DatasetBuilder, split: str) -> Any | None:
        serialized = self.features.get_serialized_info()
        if not all(getattr(serialized.get(k), "shape", None) == () for k in self.keys):
            return None
        raw_source = builder.as_data_source(
            split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
        )
        if not _has_batched_reads(raw_source) or not isinstance(raw_source[0], bytes):
            return None
        return raw_source

    def __len__(self) -> int:
        return len(self.source)

    def _decode_raw(self, record: bytes) -> dict[str, Any]:
        proto_features = tf_example_pb2.Example.FromString(record).features.feature
        example = {}
        for key in self.keys:
            proto_feature = proto_features[key]
            value = getattr(proto_feature, proto_feature.WhichOneof("kind")).value[0]
            example[key] = self.features[key].decode_example_np(value)
        return example

    def read(self, indices: Sequence[int]) -> list[Mapping[str, Any]]:
        with self._naming_damaged_shards():
            if self.raw_source is not None:
                return [self._decode_raw(r) for r in self.raw_source.__getitems__(indices)]
            if self.batched_reads:
                return list(self.source.__getitems__(indices))
            return [self.source[i] for i in indices]

    @contextlib.contextmanager
    def _naming_damaged_shards(self):
        """A failed read of a truncated or corrupt shard becomes a UserError naming the file.

        array_record reports such a file without its path ("Invalid Riegeli/records file",
        RuntimeError), or returns no records at all (a ValueError or TypeError when decoding);
        only then are the split's shards checked, one by one.
        """
        try:
            yield
        except UserError:
            raise
        except (RuntimeError, ValueError, TypeError) as error:
            damaged = damaged_shards(self.builder, self.split)
            riegeli = any(word in str(error) for word in ("Riegeli", "ArrayRecord"))
            if not damaged and not riegeli:
                raise
            files = "; ".join(damaged) or f"a file under {self.builder.data_dir} ({error})"
            raise UserError(
                f"Dataset {tfds_name(self.builder)!r} has damaged files in split "
                f"{self.split!r}: {files}. They are truncated or corrupt (a copy or download cut "
                "short, or a disk that filled up while the dataset was prepared). Delete "
                f"{self.builder.data_dir} and prepare the dataset again: the shapes dataset is "
                "generated again by the next run; others with "
                "download_and_prepare(file_format='array_record')."
            ) from error


def damaged_shards(builder: tfds.core.DatasetBuilder, split: str) -> list[str]:
    """'<path> (what is wrong)' for each ArrayRecord file of the split that is missing, does not
    open, holds another number of records than the dataset info says, or cannot read its first
    and last record. Empty for other file formats and mocked datasets."""
    from array_record.python import array_record_module

    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        return []
    damaged = []
    for name in _split_names(split):
        try:
            info = builder.info.splits[name]
            shards = list(zip(info.filepaths, info.shard_lengths, strict=True))
        except (KeyError, ValueError, AttributeError):
            continue
        for path, expected in shards:
            path = os.fspath(path)
            if not os.path.isfile(path):
                damaged.append(f"{path} (missing)")
                continue
            try:
                reader = array_record_module.ArrayRecordReader(path)
                try:
                    count = reader.num_records()
                    if count == expected and count:
                        reader.read([0, count - 1])
                finally:
                    reader.close()
            except (RuntimeError, ValueError, OSError) as error:
                reason = (str(error).splitlines() or [type(error).__name__])[0].split("; ")[0]
                damaged.append(f"{path} ({reason})")
                continue
            if count != expected:
                damaged.append(f"{path} (holds {count} of its {expected} records)")
    return damaged


def needed_keys(config: SourceConfig, features: Mapping[str, Any]) -> list[str]:
    """The features a batch is made of: image, caption or template fields, and the labels."""
    keys = [config.image_key, *_label_keys(features)]
    if config.caption_template is None and config.label_key is None:
        keys.append(config.caption_key)
    else:
        template = config.caption_template or DEFAULT_CAPTION_TEMPLATE
        for field in template_fields(template):
            keys.append(config.label_key if field == "label" and config.label_key else field)
    return list(dict.fromkeys(keys))


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
    tokenizer: transformers.PreTrainedTokenizerBase
    context_length: int
    negative_caption_attributes: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self):
        self.features = self.reader.features
        self.label_keys = _label_keys(self.features)
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

    def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        records = self.reader.read([int(i) for i in indices])
        images = np.stack([np.asarray(r[self.config.image_key]) for r in records])
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise UserError(
                f"Expected (H, W, 1 or 3) images in {self.config.image_key!r}, "
                f"got a batch of shape {images.shape}"
            )
        if images.shape[-1] == 1:  # grayscale datasets (e.g. mnist) as RGB
            images = np.repeat(images, 3, axis=-1)
        captions = [self.caption(r) for r in records]
        tokens, mask = tokenize(self.tokenizer, captions, self.context_length)
        batch = {
            "image": images.astype(np.float32) / 127.5 - 1.0,  # (b, H, W, 3) in [-1, 1]
            "tokens": tokens,  # (b, L) int32
            "mask": mask,  # (b, L) int32, 1 on real tokens
        }
        if self.negative_caption_attributes:
            negatives = self.negative_captions(records, captions, indices)
            batch["negative_caption_tokens"], batch["negative_caption_mask"] = tokenize(
                self.tokenizer, negatives, self.context_length
            )
        for key in self.label_keys:
            batch[key] = np.array([int(r[key]) for r in records], np.int32)  # (b,)
        return batch


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
        builder = _builder(config)
        label_keys = tuple(_label_keys(builder.info.features))
        unknown = [a for a in attributes if a not in label_keys]
        if unknown:
            raise UserError(
                f"Hard-negative attribute(s) {unknown} are not ClassLabel features of "
                f"{config.name!r}; valid: {list(label_keys)}"
            )
        reader = RecordReader(builder, split, label_keys)
        records = []
        for start in range(0, len(reader), 4096):
            records += reader.read(range(start, min(start + 4096, len(reader))))
        labels = np.array([[int(r[k]) for k in label_keys] for r in records], np.int64)
        return cls(
            labels.reshape(len(records), len(label_keys)), label_keys, tuple(attributes), seed
        )

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
# The pipeline
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
) -> grain.DatasetIterator:
    """A checkpointable iterator of this process's batches (see the module docstring).

    Each batch is a dict of numpy arrays: 'image' float32 (b, H, W, 3) in [-1, 1], 'tokens'
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
    reader = open_source(source_config, split)
    if (num_epochs or 1) * len(reader) < global_batch_size:
        raise UserError(
            f"{num_epochs or 1} epoch(s) of the {len(reader)} records of split {split!r} cannot "
            f"fill one batch of {global_batch_size}; lower the batch size or raise num_epochs"
        )
    if hard_negative_attributes and global_batch_size % (2 * process_count):
        raise UserError(
            f"Hard negatives pair up rows, so global_batch_size {global_batch_size} must be a "
            f"multiple of 2 x process_count = {2 * process_count}"
        )
    decoder = BatchDecoder(
        reader, source_config, tokenizer, context_length, tuple(negative_caption_attributes), seed
    )
    if negative_caption_attributes:
        decoder(np.arange(1))  # a caption without the words fails here, not in a grain thread
    own_rows = slice(process_index * local_batch_size, (process_index + 1) * local_batch_size)

    dataset = grain.MapDataset.range(len(reader))
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
