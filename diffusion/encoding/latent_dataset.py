"""A TFDS dataset of autoencoder latents, written shard by shard so that a killed job resumes.

Layout (what `tfds.builder(name, data_dir=OUTPUT_DIR)` and `tfds.builder_from_directory` read,
with no builder class and no TensorFlow):

    OUTPUT_DIR/NAME/1.0.0/
        plan.json                           what is being encoded (written first; a rerun with
                                            another plan, finished or not, is refused, never
                                            mixed in)
        NAME-SPLIT.array_record-00000-of-000NN    one file per shard, each written to a dotted
                                            temporary and renamed: a file that exists is whole
                                            (one damaged later is set aside and encoded again)
        dataset_info.json, features.json, *.labels.txt   written by TFDS once every shard is
        empty_caption.npz                   with --text_encoder: the empty caption's text
                                            features (atomically, before encoding.json)
        encoding.json                       the autoencoder and latent statistics (and the text
                                            encoder, its step, tokenizer and context length);
                                            written last, so its presence means the dataset is
                                            complete

Records hold `latent_mean` and `latent_std` (float32 (h, w, c), the posterior of each image, so
training draws its own latent per step) and every other feature of the source record unchanged
(captions, class labels with their names). With --text_encoder they also hold the caption's
text features (`diffusion.data.latents.text_keys`: `text_context` (L, D), `text_mask` (L,),
`text_pooled` (E,), and with --text_words `text_words` (L, W)).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from tensorflow_datasets.proto import tf_example_pb2

from diffusion.data import latents
from diffusion.data.latents import ENCODING_FILE
from diffusion.errors import UserError, os_error_of

VERSION = "1.0.0"
PLAN_FILE = "plan.json"
TEMPORARY_SUFFIX = ".tmp"
DAMAGED_SUFFIX = ".damaged"
# One record per group: random access by index, as grain reads (TFDS writes the same).
ARRAY_RECORD_OPTIONS = "group_size:1"


def latent_features(
    source_features: Mapping[str, Any], image_key: str, latent_shape: tuple[int, ...]
) -> tfds.features.FeaturesDict:
    """The source's features with the image (or clip) replaced by the posterior's mean and std,
    each of `latent_shape` ((h, w, c), or (T, h, w, c) for a clip)."""
    latent = lambda: tfds.features.Tensor(
        shape=latent_shape, dtype=np.float32, encoding=tfds.features.Encoding.BYTES
    )
    kept = {key: feature for key, feature in source_features.items() if key != image_key}
    return tfds.features.FeaturesDict(
        {**kept, latents.MEAN_KEY: latent(), latents.STD_KEY: latent()}
    )


class PlanChanged(UserError):
    """The directory holds an encoding of another plan: its shards are kept, nothing mixed in."""

    def __init__(self, root: str, changed: list[str], earlier: Mapping[str, Any]):
        super().__init__(
            f"{root} holds an encoding with another plan (differs in {changed}); its shards are "
            "kept as they are. Pass another --output_dir (or --name), or delete that directory "
            "to encode again."
        )
        self.root, self.changed, self.earlier = root, changed, dict(earlier)


@dataclasses.dataclass(frozen=True)
class Shard:
    split: str
    index: int
    start: int  # first example of the split in this shard
    stop: int


class LatentDatasetWriter:
    """Plans the shards of every split, writes each atomically, and the metadata at the end."""

    def __init__(
        self,
        output_dir: str,
        name: str,
        features: tfds.features.FeaturesDict,
        split_lengths: Mapping[str, int],
        examples_per_shard: int,
    ):
        if examples_per_shard < 1:
            raise UserError(f"examples_per_shard must be >= 1, got {examples_per_shard}")
        self.name, self.features = name, features
        self.root = os.path.join(output_dir, name, VERSION)
        self.split_lengths = dict(split_lengths)
        self.examples_per_shard = examples_per_shard

    # -- the plan -------------------------------------------------------------------------------

    def shards(self) -> list[Shard]:
        """Every shard of every split, in a fixed order (the same in every process)."""
        result = []
        for split, length in self.split_lengths.items():
            count = max(1, math.ceil(length / self.examples_per_shard))
            for index in range(count):
                start = index * self.examples_per_shard
                result.append(
                    Shard(split, index, start, min(length, start + self.examples_per_shard))
                )
        return result

    def num_shards(self, split: str) -> int:
        return sum(1 for shard in self.shards() if shard.split == split)

    def shard_path(self, shard: Shard) -> str:
        count = self.num_shards(shard.split)
        name = f"{self.name}-{shard.split}.array_record-{shard.index:05d}-of-{count:05d}"
        return os.path.join(self.root, name)

    def start(self, plan: Mapping[str, Any]) -> None:
        """Creates the directory and records `plan`, or checks that an earlier run had the same
        plan (then its whole shards are kept); removes temporaries of killed runs. One process
        calls this before any shard is written."""
        os.makedirs(self.root, exist_ok=True)
        if not self.check_plan(plan):
            _write_atomically(self._plan_path(), _plan_json(plan))
        for name in os.listdir(self.root):
            if name.endswith(TEMPORARY_SUFFIX):
                os.remove(os.path.join(self.root, name))
        for shard in self.shards():
            self._set_aside_if_damaged(shard)

    def check_plan(self, plan: Mapping[str, Any]) -> bool:
        """Raises PlanChanged where the directory records another plan than `plan` (finished
        or not: a finished dataset of another plan is not what was asked for either); False
        where it records none yet."""
        path = self._plan_path()
        if not os.path.exists(path):
            return False
        with open(path, encoding="utf-8") as f:
            earlier = json.load(f)
        plan = json.loads(_plan_json(plan))  # as it reads back
        if earlier != plan:
            changed = sorted(
                k for k in plan.keys() | earlier.keys() if plan.get(k) != earlier.get(k)
            )
            raise PlanChanged(self.root, changed, earlier)
        return True

    def _plan_path(self) -> str:
        return os.path.join(self.root, PLAN_FILE)

    def _set_aside_if_damaged(self, shard: Shard) -> None:
        """A shard file whose record count is not its shard's (truncated or overwritten after
        it was renamed into place: a copy cut short, a disk fault) is renamed to a dotted
        `.damaged` file, kept for a person to inspect, and this run encodes the shard again."""
        path = self.shard_path(shard)
        if not os.path.exists(path):
            return
        expected = shard.stop - shard.start
        found = _record_count(path)
        if found == expected:
            return
        aside = os.path.join(self.root, "." + os.path.basename(path) + DAMAGED_SUFFIX)
        os.replace(path, aside)
        print(
            f"warning: {path} holds {found} records, not its {expected} examples (truncated or "
            f"corrupt); moved it to {aside} and encoding the shard again",
            flush=True,
        )

    # -- shards ---------------------------------------------------------------------------------

    def is_written(self, shard: Shard) -> bool:
        return os.path.exists(self.shard_path(shard))

    def write(self, shard: Shard, examples: Iterable[Mapping[str, Any]]) -> None:
        """Serializes `examples` into the shard's file: a temporary first, renamed when whole.

        Whatever ends the write early (a full disk, an exception or a stop request raised by
        `examples`) removes the temporary and leaves the shards written before untouched; a
        failed write is an OSError naming the shard's file (array_record's own error names the
        temporary, or no file)."""
        path = self.shard_path(shard)
        temporary = os.path.join(self.root, "." + os.path.basename(path) + TEMPORARY_SUFFIX)
        count = 0
        try:
            writer = array_record_module.ArrayRecordWriter(temporary, ARRAY_RECORD_OPTIONS)
            try:
                for example in examples:
                    writer.write(_deterministic(self.features.serialize_example(example)))
                    count += 1
            finally:
                writer.close()
        except BaseException as error:
            if os.path.exists(temporary):
                os.remove(temporary)
            os_error = os_error_of(error) if isinstance(error, Exception) else None
            if os_error is not None:
                raise OSError(os_error.errno, os_error.strerror, path) from error
            raise
        if count != shard.stop - shard.start:
            os.remove(temporary)
            raise RuntimeError(
                f"{path}: {count} examples for a shard of {shard.stop - shard.start}"
            )
        os.replace(temporary, path)

    # -- the end --------------------------------------------------------------------------------

    def is_complete(self) -> bool:
        return os.path.exists(os.path.join(self.root, ENCODING_FILE))

    def write_metadata(self, description: str) -> None:
        """TFDS's metadata of the written shards: the dataset reads from here on."""
        missing = [self.shard_path(s) for s in self.shards() if not self.is_written(s)]
        if missing:
            raise RuntimeError(f"cannot finish {self.root}: shards missing: {missing[:3]}")
        split_infos = [
            tfds.core.SplitInfo(
                name=split,
                shard_lengths=[s.stop - s.start for s in self.shards() if s.split == split],
                num_bytes=sum(
                    os.path.getsize(self.shard_path(s)) for s in self.shards() if s.split == split
                ),
                filename_template=tfds.core.ShardedFileTemplate(
                    data_dir=self.root,
                    template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
                    dataset_name=self.name,
                    split=split,
                    filetype_suffix="array_record",
                ),
            )
            for split in self.split_lengths
        ]
        tfds.folder_dataset.write_metadata(
            data_dir=self.root,
            features=self.features,
            split_infos=split_infos,
            version=VERSION,
            check_data=False,  # reading it back would need TensorFlow; the tests read it
            description=description,
        )

    def finish(self, encoding: Mapping[str, Any]) -> None:
        """encoding.json, the completion mark: written last."""
        path = os.path.join(self.root, ENCODING_FILE)
        _write_atomically(path, json.dumps(dict(encoding), indent=1, sort_keys=True) + "\n")


def read_encoding(dataset_dir: str) -> dict[str, Any]:
    """encoding.json of a finished latent dataset (OUTPUT_DIR/NAME/1.0.0)."""
    values = latents.read_encoding(dataset_dir)
    if values is None:
        raise UserError(
            f"{dataset_dir} has no {ENCODING_FILE}: it is not a finished latent dataset (rerun "
            "the same encode.py command to finish it)."
        )
    return values


def _record_count(path: str) -> int:
    """The records array_record finds in a file; 0 where it cannot read one (a truncated file
    opens as 0 records, and then fails to close)."""
    try:
        reader = array_record_module.ArrayRecordReader(path)
        try:
            return reader.num_records()
        finally:
            reader.close()
    except (RuntimeError, ValueError):
        return 0


def _deterministic(record: bytes) -> bytes:
    """The tf.train.Example with its feature map in key order: protobuf writes maps in hash
    order, which differs between processes (string hashing is salted per process), and a
    resumed job must write the bytes an uninterrupted one writes."""
    return tf_example_pb2.Example.FromString(record).SerializeToString(deterministic=True)


def _plan_json(plan: Mapping[str, Any]) -> str:
    return json.dumps(dict(plan), indent=1, sort_keys=True) + "\n"


def _write_atomically(path: str, text: str) -> None:
    temporary = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + TEMPORARY_SUFFIX)
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
