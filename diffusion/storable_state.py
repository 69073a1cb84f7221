"""A train state (or any pytree of arrays) <-> the nested dict of plain arrays that Orbax stores.

``nnx.Variable`` boxes are unwrapped and the tree's path names become the dict's keys, so that
``nnx.State``, optax states and plain dicts all store the same way. Typed PRNG keys are stored as
their ``jax.random.key_data`` and re-wrapped on restore. Restoring needs an abstract tree of the
saved structure; it gives each leaf's target sharding.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _path_name(key: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _leaves_with_names(tree: Any) -> tuple[list[tuple[tuple[str, ...], Any]], Any]:
    """Array leaves (Variables unwrapped) with their path names, and the tree's structure."""
    unboxed = jax.tree.map(
        lambda x: x.get_value() if _is_variable(x) else x, tree, is_leaf=_is_variable
    )
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(unboxed)
    named = [(tuple(_path_name(k) for k in path), leaf) for path, leaf in leaves_with_path]
    return named, (jax.tree.structure(tree, is_leaf=_is_variable), treedef)


def _nest(named_leaves: list[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for names, leaf in named_leaves:
        node = nested
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1] if names else "value"] = leaf
    return nested


def _unnest(nested: Mapping[str, Any], names: tuple[str, ...]) -> Any:
    node: Any = nested
    for name in names or ("value",):
        node = node[name]
    return node


def _storable_leaf(x: Any) -> Any:
    return jax.random.key_data(x) if _is_key(x) else x


def _storable_target(x: Any) -> Any:
    """Restore target of one leaf; typed keys become their uint32 key data."""
    if not _is_key(x):
        return x
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(x, "sharding", None))


def _abstract(x: Any) -> Any:
    """Restore-target leaf: a concrete array becomes a ShapeDtypeStruct with its sharding."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))


def named_storable_leaves(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
    """The leaves as they are stored (typed keys as key data), each with its path names."""
    named, _ = _leaves_with_names(tree)
    return [(names, _storable_leaf(leaf)) for names, leaf in named]


def to_storable(tree: Any) -> dict[str, Any]:
    """The nested dict of arrays that Orbax saves for ``tree``."""
    return _nest(named_storable_leaves(tree))


def restore_target(abstract_tree: Any) -> tuple[Any, dict[str, Any]]:
    """(abstract tree, Orbax restore target) for a tree of the saved structure.

    ``abstract_tree``'s leaves may be ``jax.ShapeDtypeStruct`` (with the target sharding) or
    concrete arrays (their sharding is used); the abstract tree has ShapeDtypeStruct leaves and
    is what :func:`from_storable` rebuilds onto.
    """
    abstract = jax.tree.map(_abstract, abstract_tree, is_leaf=_is_key)
    named, _ = _leaves_with_names(abstract)
    return abstract, _nest([(names, _storable_target(leaf)) for names, leaf in named])


def from_storable(stored: Mapping[str, Any], abstract_tree: Any) -> Any:
    """The tree of ``abstract_tree``'s structure (Variables, typed keys) from a restored dict."""
    named, (outer, _) = _leaves_with_names(abstract_tree)
    values = []
    for names, target in named:
        value = _unnest(stored, names)
        if _is_key(target):
            value = jax.random.wrap_key_data(value, impl=target.dtype._impl)  # noqa: SLF001
        values.append(value)
    # Rebuild with Variables where the target had them.
    leaves_iter = iter(values)

    def refill(x):
        if _is_variable(x):
            if not jax.tree.leaves(x.get_value()):  # optax.MaskedNode: nothing was stored
                return x
            return x.replace(next(leaves_iter))
        return next(leaves_iter)

    return jax.tree.map(refill, abstract_tree, is_leaf=_is_variable)
