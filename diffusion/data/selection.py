"""A record filter on a dataset's ClassLabel features (config.data.where).

"motion=up,size=small" keeps the records whose every named label has that value: training then
ranges over those records only, and held-out evaluation reads its examples from them, e.g. to
fine-tune a LoRA on one motion and evaluate it on the same one. A value is a label name, or its
integer index. Finding the records reads only the label columns of the split, never its images
or clips.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from diffusion.data.sources import SourceConfig, class_label_keys, dataset_builder, label_columns
from diffusion.errors import UserError


def parse_where(where: str) -> tuple[tuple[str, str], ...]:
    """ "motion=up, size=small" -> (("motion", "up"), ("size", "small")); "" -> () (no filter).
    Names may hold spaces ("motion=left to right"), not commas or '='."""
    conditions = []
    for item in where.split(",") if where.strip() else ():
        key, equals, value = (part.strip() for part in item.partition("="))
        if not equals or not key or not value or "=" in value:
            raise UserError(
                f"config.data.where={where!r}: {item.strip()!r} is not a condition KEY=NAME; "
                "give comma-separated conditions such as 'motion=up,size=small' (a ClassLabel "
                "feature and one of its names), or '' for every record"
            )
        conditions.append((key, value))
    return tuple(conditions)


def _label_index(names: list[str], key: str, value: str, where: str) -> int:
    """The index of `value` among a ClassLabel's names; an integer index is taken as it is."""
    if value in names:
        return names.index(value)
    if value.isdigit() and int(value) < len(names):
        return int(value)
    raise UserError(
        f"config.data.where={where!r}: {value!r} is not a name of the ClassLabel {key!r}; "
        f"its names are {names} (or their indices 0 to {len(names) - 1})"
    )


def label_conditions(
    where: str, features: Mapping[str, Any], dataset: str
) -> tuple[tuple[str, int], ...]:
    """The conditions of `where` as (ClassLabel key, label index) pairs, each checked against
    the dataset's features: a key that is not a scalar ClassLabel or a name not among its names
    fails with the valid choices."""
    label_keys = class_label_keys(features)
    conditions = []
    for key, value in parse_where(where):
        if key not in label_keys:
            raise UserError(
                f"config.data.where={where!r}: {key!r} is not a ClassLabel feature of "
                f"{dataset!r}; filter on one of {label_keys}"
            )
        conditions.append((key, _label_index(list(features[key].names), key, value, where)))
    return tuple(conditions)


def matching(
    labels: Mapping[str, np.ndarray], conditions: tuple[tuple[str, int], ...], count: int
) -> np.ndarray:
    """(count,) bool: which records satisfy every condition, from their (count,) label columns."""
    keep = np.ones(count, bool)
    for key, index in conditions:
        keep &= np.asarray(labels[key]) == index
    return keep


def selected_records(config: SourceConfig, split: str) -> np.ndarray | None:
    """The ascending indices of the split's records that satisfy `config.where` (None without a
    filter: every record), read from the label columns only. A filter that keeps no record
    fails, naming the split and the filter."""
    conditions_text = config.where
    if not conditions_text.strip():
        return None
    builder = dataset_builder(config)
    conditions = label_conditions(conditions_text, builder.info.features, config.name)
    keys = sorted({key for key, _ in conditions})
    labels = label_columns(builder, split, keys)
    columns = dict(zip(keys, labels.T, strict=True))
    indices = np.flatnonzero(matching(columns, conditions, len(labels)))
    if not len(indices):
        raise UserError(
            f"config.data.where={conditions_text!r} keeps none of the {len(labels)} records of "
            f"split {split!r} of {config.name!r}; choose values that occur together in that "
            "split (held-out splits may hold other combinations than train), filter on fewer "
            "features, or leave the split out (config.data.eval_splits, evaluate.py --splits)"
        )
    return indices
