"""Opening a TFDS dataset prepared as ArrayRecord, and reading batches of its records.

Any TFDS image dataset prepared as array_record can be read (`SourceConfig`); captions come
either from a text feature or from a template over the features ("a photo of a {label}"). A bad
name, split or feature key fails when the dataset is opened, with the valid choices, and a
truncated or corrupt shard fails with the path of the file (`damaged_shards`). Nothing is
downloaded at run time: the embedded shapes and moving_shapes datasets are generated
(`build_dataset`, `build_moving_shapes`), any other must already be prepared under its data_dir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

from diffusion.data import moving_shapes as moving_shapes_lib
from diffusion.data import shapes as shapes_lib
from diffusion.data.latents import STD_KEY, LatentEncoding
from diffusion.errors import UserError

DEFAULT_CAPTION_TEMPLATE = "a photo of a {label}"
GENERATED_DATASETS = ("shapes", "moving_shapes")  # embedded: generated here, never downloaded


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """Which TFDS dataset to read and how to get an image and a caption from each record."""

    name: str = "shapes"  # TFDS name, optionally "name/config:version", e.g. "shapes/32"
    data_dir: str | None = None  # TFDS data_dir; None uses TFDS's default (~/tensorflow_datasets)
    image_key: str = "image"  # uint8 image feature (H, W, 1 or 3)
    caption_key: str | None = "caption"  # text feature; used when both fields below are None
    label_key: str | None = None  # ClassLabel whose name fills {label} in caption_template
    caption_template: str | None = None  # e.g. "a {size} {label}"; default "a photo of a {label}"
    # An encoded dataset's latents (image_key is then its posterior mean); None: images.
    latents: LatentEncoding | None = None
    # Record filter on ClassLabels, "key=name,key=name" (`diffusion.data.selection`); "": all.
    where: str = ""


# ---------------------------------------------------------------------------------------------
# Opening a dataset, with errors that say what would be valid
# ---------------------------------------------------------------------------------------------


def _prepared_under(config: SourceConfig) -> bool:
    """Whether data_dir holds a prepared copy of the dataset (its dataset_info.json)."""
    directory = os.path.join(config.data_dir, dataset_name(config.name))
    return os.path.isdir(directory) and any(
        os.path.exists(os.path.join(root, "dataset_info.json")) for root, _, _ in os.walk(directory)
    )


def dataset_name(name: str) -> str:
    return name.split("/")[0].split(":")[0]


def dataset_builder(config: SourceConfig) -> tfds.core.DatasetBuilder:
    """The TFDS builder of `config.name`; an unknown name fails with the close matches."""
    known = tfds.list_builders(with_community_datasets=False)
    base = dataset_name(config.name)
    if base not in known and config.data_dir and _prepared_under(config):
        # Prepared without a registered builder class (encode.py's latent datasets, or a
        # dataset whose builder module is not imported): TFDS reads it from its metadata.
        return tfds.builder(config.name, data_dir=config.data_dir)
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


def check_split(builder: tfds.core.DatasetBuilder, split: str) -> None:
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


def _check_features(config: SourceConfig, features: Mapping[str, Any], captions: bool) -> None:
    available = sorted(features)

    def require(key: str, role: str) -> None:
        if key not in features:
            raise UserError(f"{role} {key!r} is not a feature of {config.name!r}; {available}")

    require(config.image_key, "image_key")
    if not captions:
        return
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


def open_source(config: SourceConfig, split: str, captions: bool = True) -> RecordReader:
    """A batched reader of one split, after checking the name, split and feature keys.

    captions: whether captions are read (False: images and ClassLabels only, e.g. for a
    class-conditional model, so a dataset without caption features needs none configured)."""
    builder = dataset_builder(config)
    check_split(builder, split)
    features = builder.info.features
    _check_features(config, features, captions)
    try:
        # `builder.as_data_source` rather than `tfds.data_source`, which may miss a local
        # dataset that the builder finds (tfds#5665).
        return RecordReader(builder, split, needed_keys(config, features, captions))
    except (NotImplementedError, FileNotFoundError, AssertionError, KeyError) as error:
        if builder.is_prepared():
            raise
        hint = (
            "build_dataset(...) or build_moving_shapes(...)"
            if dataset_name(config.name) in GENERATED_DATASETS
            else "download_and_prepare(file_format='array_record') where it has network access"
        )
        raise UserError(
            f"Dataset {config.name!r} is not prepared under data_dir={config.data_dir!r}; "
            f"run {hint} first (nothing is downloaded at run time)."
        ) from error


def _prepare_generated(builder_name: str, builder_config, data_dir: str | None):
    """Generates an embedded dataset under data_dir if missing (offline) -> its builder."""
    try:
        builder = tfds.builder(builder_name, config=builder_config, data_dir=data_dir)
        with _shuffle_in_memory():
            builder.download_and_prepare()
    except OSError as error:  # e.g. data_dir is a file, or not writable
        raise UserError(
            f"Cannot prepare the {builder_name} dataset under data_dir={data_dir!r}: {error}. "
            "Point config.data.data_dir (evaluate.py: --data_dir) at a writable directory."
        ) from error
    return builder


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
    other name (moving_shapes: `build_moving_shapes`) must already be prepared under data_dir.
    `tfds_name(builder)` gives the name for `SourceConfig` (e.g. "shapes/32")."""
    if dataset_name(name) != "shapes":
        builder = dataset_builder(SourceConfig(name=name, data_dir=data_dir))
        if not builder.is_prepared():
            raise UserError(
                f"Dataset {name!r} is not prepared under data_dir={data_dir!r}; only 'shapes' "
                "is generated here, and 'moving_shapes' by build_moving_shapes (nothing is "
                "downloaded at run time)."
            )
        return builder
    config = shapes_lib.shapes_config(
        resolution,
        num_train=num_train,
        num_test=num_test,
        num_test_unseen=num_test_unseen,
        seed=seed,
    )
    return _prepare_generated("shapes", config, data_dir)


def moving_shapes_size(builder_config: str | None) -> tuple[int, int]:
    """(resolution, frames) that a moving_shapes builder config such as "32_8" names; None
    names the default. The split sizes and seed come from the recipe's data section, as for
    shapes, so a name that spells them is refused rather than half-followed."""
    valid = [
        f"{r}_{f}" for r in moving_shapes_lib.RESOLUTIONS for f in moving_shapes_lib.FRAME_COUNTS
    ]
    if builder_config is None:
        return moving_shapes_lib.RESOLUTIONS[0], moving_shapes_lib.FRAME_COUNTS[0]
    match = re.fullmatch(r"(\d+)_(\d+)", str(builder_config))
    if match is None or str(builder_config) not in valid:
        raise UserError(
            f"config.data.builder_config={builder_config!r} is not a moving_shapes config; valid: "
            f"{valid} (resolution_frames). Set the split sizes with config.data.num_train_examples"
            " and config.data.num_eval_examples."
        )
    return int(match[1]), int(match[2])


def build_moving_shapes(
    data_dir: str | None,
    builder_config: str | None = None,
    *,
    num_train: int = moving_shapes_lib.DEFAULT_NUM_EXAMPLES["train"],
    num_test: int = moving_shapes_lib.DEFAULT_NUM_EXAMPLES["test"],
    num_test_unseen: int = moving_shapes_lib.DEFAULT_NUM_EXAMPLES["test_unseen"],
    seed: int = 0,
) -> tfds.core.DatasetBuilder:
    """Prepares the embedded moving_shapes dataset of `builder_config` ("32_8": 8 frames of
    32x32) if missing (offline), like `build_dataset` the shapes, and returns its builder."""
    resolution, frames = moving_shapes_size(builder_config)
    config = moving_shapes_lib.moving_shapes_config(
        resolution,
        frames,
        num_train=num_train,
        num_test=num_test,
        num_test_unseen=num_test_unseen,
        seed=seed,
    )
    return _prepare_generated("moving_shapes", config, data_dir)


@contextlib.contextmanager
def _shuffle_in_memory(limit_bytes: int = 16 << 30):
    """TFDS shuffles a split in memory up to 1 GB and spills larger ones to disk through
    TensorFlow's file API, which is not installed: the 100k-example train split at 64x64 (1.2 GB
    raw) would fail. In memory the records come out in the same order (sorted by key hash)."""
    from tensorflow_datasets.core import shuffle

    before = shuffle.MAX_MEM_BUFFER_SIZE
    shuffle.MAX_MEM_BUFFER_SIZE = max(before, limit_bytes)
    try:
        yield
    finally:
        shuffle.MAX_MEM_BUFFER_SIZE = before


def tfds_name(builder: tfds.core.DatasetBuilder) -> str:
    """The "name/config:version" string that `tfds.builder` (and SourceConfig.name) accepts."""
    config = f"/{builder.builder_config.name}" if builder.builder_config else ""
    return f"{builder.name}{config}:{builder.version}"


def class_label_keys(features: Mapping[str, Any]) -> list[str]:
    """The scalar ClassLabel features; the input pipeline passes them on as int32 fields."""
    return sorted(
        key
        for key, feature in features.items()
        if isinstance(feature, tfds.features.ClassLabel) and not feature.shape
    )


def needed_keys(
    config: SourceConfig, features: Mapping[str, Any], captions: bool = True
) -> list[str]:
    """The features a batch is made of: image, caption or template fields (and cached text
    features where the dataset holds them), and the labels."""
    keys = [config.image_key, *class_label_keys(features)]
    if config.latents is not None:
        keys.append(STD_KEY)
    if not captions:
        return keys
    if config.latents is not None:
        keys.extend(config.latents.text_keys)
    if config.caption_template is None and config.label_key is None:
        keys.append(config.caption_key)
    else:
        template = config.caption_template or DEFAULT_CAPTION_TEMPLATE
        for field in template_fields(template):
            keys.append(config.label_key if field == "label" and config.label_key else field)
    return list(dict.fromkeys(keys))


# ---------------------------------------------------------------------------------------------
# Reading records
# ---------------------------------------------------------------------------------------------


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


def label_columns(
    builder: tfds.core.DatasetBuilder, split: str, keys: Sequence[str], chunk: int = 4096
) -> np.ndarray:
    """(records, len(keys)) int64: the split's ClassLabels `keys` of every record, read in chunks
    of records without decoding their images."""
    reader = RecordReader(builder, split, keys)
    rows = []
    for start in range(0, len(reader), chunk):
        records = reader.read(range(start, min(start + chunk, len(reader))))
        rows += [[int(record[key]) for key in keys] for record in records]
    return np.array(rows, np.int64).reshape(len(reader), len(keys))


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
