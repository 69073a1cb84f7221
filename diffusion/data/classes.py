"""The classes of a class-conditional model: one ClassLabel feature, or the combinations of several.

A class made of features f_0, ..., f_{k-1} with n_0, ..., n_{k-1} values is numbered in mixed
radix, the first feature most significant:

    class = (...((v_0 n_1 + v_1) n_2 + v_2) ...) n_{k-1} + v_{k-1},   0 <= class < n_0 ... n_{k-1}

so shapes' ("color", "shape") makes 8 x 5 = 40 classes, "red circle" = 0, "red square" = 1, ...
"green circle" = 5. A class's name is its values' names joined by spaces, in feature order.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from diffusion.errors import UserError


def class_features_of(data_config) -> tuple[str, ...]:
    """The ClassLabel features a recipe's class is made of: config.data.class_features, else
    (config.data.label_key,); () when it names neither."""
    features = tuple(data_config.get("class_features") or ())
    if features:
        return features
    return (data_config.label_key,) if data_config.get("label_key") else ()


def _normalise(name: str) -> str:
    return " ".join(name.lower().split())


@dataclasses.dataclass(frozen=True)
class ClassSpace:
    """The class features and their value names; numbers and names the classes (module doc)."""

    features: tuple[str, ...]
    values: tuple[tuple[str, ...], ...]  # per feature, its ClassLabel names in label order

    @classmethod
    def from_features(
        cls, features: Mapping[str, Any], keys: Sequence[str], dataset: str
    ) -> ClassSpace:
        """The space of `keys`, each a scalar ClassLabel of a dataset's `features`."""
        labels = sorted(
            k
            for k, f in features.items()
            if isinstance(f, tfds.features.ClassLabel) and not f.shape
        )
        if not keys:
            raise UserError(
                "a class-conditional DiT (config.model.num_classes > 0) needs the features its "
                f"class is made of: set config.data.class_features (e.g. {tuple(labels[:2])}) or "
                f"config.data.label_key to ClassLabel features of {dataset!r}: {labels}."
            )
        if len(set(keys)) != len(keys):
            raise UserError(f"config.data.class_features={tuple(keys)} names a feature twice.")
        for key in keys:
            if key not in labels:
                what = "not a feature" if key not in features else "not a scalar ClassLabel"
                raise UserError(
                    f"class feature {key!r} (config.data.class_features or label_key) is {what} "
                    f"of {dataset!r}; its ClassLabel features are {labels}."
                )
        return cls(tuple(keys), tuple(tuple(features[k].names) for k in keys))

    # -- numbers ------------------------------------------------------------------------------

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(v) for v in self.values)

    @property
    def num_classes(self) -> int:
        return math.prod(self.sizes)

    def ids(self, labels: Mapping[str, np.ndarray]) -> np.ndarray:
        """Class ids (N,) int32 of records' feature labels {feature: (N,) int}."""
        return np.ravel_multi_index(
            tuple(np.asarray(labels[f], np.int64) for f in self.features), self.sizes
        ).astype(np.int32)

    def feature_labels(self, class_ids) -> dict[str, np.ndarray]:
        """The inverse of `ids`: {feature: (N,) int} of class ids."""
        unravelled = np.unravel_index(np.asarray(class_ids, np.int64), self.sizes)
        return dict(zip(self.features, unravelled, strict=True))

    # -- names --------------------------------------------------------------------------------

    def name(self, class_id: int) -> str:
        labels = self.feature_labels([class_id])
        return " ".join(self.values[i][int(labels[f][0])] for i, f in enumerate(self.features))

    def names(self) -> list[str]:
        return [self.name(i) for i in range(self.num_classes)]

    def describe(self) -> str:
        """How classes are named and numbered, for error messages."""
        parts = " ".join(f"<{f}>" for f in self.features)
        return (
            f"{self.num_classes} classes ({' x '.join(map(str, self.sizes))} values of "
            f"{', '.join(self.features)}), ids 0-{self.num_classes - 1} or names '{parts}' such "
            f"as {self.name(0)!r}"
        )

    def resolve(self, value) -> int:
        """A class id (an int, or a string of digits) or a class name -> the class id."""
        if isinstance(value, bool):
            value = None
        if isinstance(value, numbers.Integral) or (isinstance(value, str) and value.isdigit()):
            class_id = int(value)
            if 0 <= class_id < self.num_classes:
                return class_id
            raise UserError(f"class {value!r} is out of range; this run has {self.describe()}.")
        if isinstance(value, str):
            names = self.names()
            wanted = _normalise(value)
            for class_id, name in enumerate(names):
                if _normalise(name) == wanted:
                    return class_id
            close = difflib.get_close_matches(wanted, names, n=3)
            hint = f" Close matches: {close}." if close else ""
            raise UserError(
                f"class {value!r} is not a class of this run; it has {self.describe()}.{hint}"
            )
        raise UserError(f"a class must be an integer id or a name, got {value!r}.")

    # -- stored in a run directory ------------------------------------------------------------

    def to_json(self) -> dict:
        return {"features": list(self.features), "values": [list(v) for v in self.values]}

    @classmethod
    def from_json(cls, record: Mapping) -> ClassSpace:
        features, values = record["features"], record["values"]
        is_names = lambda v: isinstance(v, list) and v and all(isinstance(n, str) for n in v)
        if not is_names(features) or not isinstance(values, list) or len(features) != len(values):
            raise ValueError("features must be a list of names, one per entry of values")
        if not all(is_names(v) for v in values):
            raise ValueError("values must hold a non-empty list of names per feature")
        return cls(tuple(map(str, features)), tuple(tuple(v) for v in values))
