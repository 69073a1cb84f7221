"""Logical axis names and their rules, and directly-sharded creation of states.

With `diffusion/meshes.py` (which builds the meshes) and the configs, the only place that names
mesh axes. It declares every logical axis name (:data:`PARAMETER_AXIS_NAMES`,
:data:`ACTIVATION_AXIS_NAMES`); model code annotates parameters with them (the ``out_sharding``
metadata of an ``nnx.Param``, which ``diffusion.models.layers.make_param`` sets) and constrains
activations with :func:`with_logical_constraint`. A rule list (``config.mesh.rules``, read by
:func:`rules_from_config`; :data:`DEFAULT_RULES` by default) maps those names to the mesh axes
``data`` (pure data parallelism), ``fsdp`` (batch + parameter sharding, ZeRO-3 style),
``sequence`` (the tokens of activations: sequence parallelism, which attention serves with
``implementation='ulysses'`` or ``'ring'``) and ``tensor`` (heads / MLP hidden units), in the
style of MaxText and big_vision.

Rules are a sequence of ``(logical_name, mesh_axes)`` pairs, where ``mesh_axes`` is a mesh axis
name, a tuple of them, or ``None`` (replicated). They are applied with Flax linen's priority
semantics (``flax.linen.logical_to_mesh_axes``): the first rule for a name wins, and a mesh axis
already used by an earlier dimension of the same array is not used twice (so an array named
``('activation_batch', 'embed')`` gets ``('data', 'fsdp')`` on the batch and leaves ``embed``
unsharded, while an ``('embed', 'mlp')`` kernel gets ``('fsdp', 'tensor')``).

Divisibility: when a dimension is not divisible by the product of its mesh axes, the longest
prefix of those axes whose size divides it is used (``('data', 'fsdp')`` -> ``('data',)`` ->
replicated), for parameters and activations alike. The array is never padded; the fallback is
logged at WARNING level because it costs memory. Mesh axes named by a rule but absent from the
mesh are ignored.

Eager sharding: Flax 0.12 shards a Variable with ``out_sharding`` metadata as it is created, which
needs a mesh in context and ignores our divisibility fallback. :func:`create_sharded` turns it off
and places every array through ``jax.jit(..., out_shardings=...)`` instead; code that builds an
annotated model outside a mesh should do the same (``with nnx.use_eager_sharding(False): ...``).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from flax.linen import spmd as linen_spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from diffusion.errors import UserError

logger = logging.getLogger(__name__)

# Canonical axis order: slowest (DCN-friendly) first; 'sequence' and 'tensor' last, as their
# all-to-alls and all-gathers run in every block and want the fastest links.
MESH_AXES = ("data", "fsdp", "sequence", "tensor")
BATCH_AXES = ("data", "fsdp")  # Mesh axes the batch dimension is split over.

MeshAxes = str | tuple[str, ...] | None
LogicalRules = Sequence[tuple[str, MeshAxes]]

# Every logical axis name a parameter may carry. The declared names are the whole vocabulary:
# `diffusion.models.layers.make_param` refuses others, and `rules_from_config` asks rules to cover
# each of them.
PARAMETER_AXIS_NAMES = (
    "embed",  # model width (residual stream)
    "mlp",  # hidden units of MLPs and other wide intermediate layers
    "heads",  # attention heads
    "kv",  # per-head feature dimension
    "vocab",  # token-embedding rows
    "classes",  # class-label embedding rows
    "length",  # rows of a learned position table
    "patch",  # flattened patch pixels (p * p * channels)
    "projection",  # CLIP's shared image-text embedding space
    "norm",  # LayerNorm scale and bias
    "layers",  # the stacked-block axis that scanned block stacks add
    "height",  # spatial rows of a convolution kernel
    "width",  # spatial columns of a convolution kernel
    "frames",  # temporal taps of a 3-D (video) convolution kernel
    "conv_in",  # input channels of a pixel-space convolution
    "channels",  # output channels of a pixel-space convolution
    "lora_rank",  # the rank axis of a low-rank adapter's two factors (diffusion/models/lora.py)
)
# Every logical axis name an activation may carry (with_logical_constraint); prefixed so that a
# rule can shard an activation differently from the parameters of the same width.
ACTIVATION_AXIS_NAMES = (
    "activation_batch",  # examples of the batch
    "activation_length",  # tokens of a sequence
    "activation_embed",  # model width of the residual stream
    "activation_mlp",  # hidden units of an MLP
)
LOGICAL_AXIS_NAMES = PARAMETER_AXIS_NAMES + ACTIVATION_AXIS_NAMES

# Logical name -> mesh axes, the default of config.mesh.rules. The batch is split over
# ('data', 'fsdp'); 'embed' is the FSDP-sharded parameter width; 'mlp', 'heads' and 'vocab' (and
# an MLP's hidden activations) are tensor-parallel; the tokens of activations are split over
# 'sequence' (size 1, and so no split, unless config.mesh.sequence says otherwise); the rest
# replicate.
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("activation_batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("classes", None),
    ("length", None),
    ("projection", None),
    ("norm", None),
    ("layers", None),
    ("activation_length", "sequence"),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("height", None),
    ("width", None),
    ("frames", None),
    ("channels", None),
    ("patch", None),
    ("conv_in", None),
    ("lora_rank", None),  # a handful of units: splitting them would only add communication
)


def rules_from_config(mesh_config: Mapping[str, Any]) -> tuple[tuple[str, MeshAxes], ...]:
    """The logical-axis rules of ``config.mesh.rules``, checked and as tuples.

    The field is a sequence of ``(logical_name, mesh_axes)`` pairs (lists, as a config.json
    holds them, are accepted); a config section without it gets :data:`DEFAULT_RULES`.

    Raises:
      UserError: naming ``config.mesh.rules``, the bad entry and the valid names, when an entry is
        not a pair, names an undeclared logical name or a mesh axis outside :data:`MESH_AXES`, or
        when a declared logical name has no rule.
    """
    raw = mesh_config.get("rules")
    if raw is None:
        return DEFAULT_RULES

    def bad(what: str) -> UserError:
        return UserError(
            f"config.mesh.rules: {what}. Each rule is a (logical_name, mesh_axes) pair: "
            f"logical_name one of {', '.join(LOGICAL_AXIS_NAMES)}; mesh_axes one of "
            f"{', '.join(MESH_AXES)}, a tuple of them, or None (replicated). Example: "
            "--config.mesh.rules=\"(('activation_batch', ('data', 'fsdp')), ('embed', 'fsdp'), "
            "('mlp', 'tensor'), ('kv', None), ...)\" with one or more rules for every name."
        )

    if isinstance(raw, str | bytes) or not isinstance(raw, Sequence):
        raise bad(f"{raw!r} is not a sequence of rules")
    rules = []
    for entry in raw:
        if isinstance(entry, str | bytes) or not isinstance(entry, Sequence) or len(entry) != 2:
            raise bad(f"entry {entry!r} is not a (logical_name, mesh_axes) pair")
        name, axes = entry
        if name not in LOGICAL_AXIS_NAMES:
            raise bad(f"entry {tuple(entry)!r} names the unknown logical axis {name!r}")
        if axes is not None and not isinstance(axes, str):
            if not isinstance(axes, Sequence) or not all(isinstance(a, str) for a in axes):
                raise bad(f"entry {tuple(entry)!r} has mesh axes {axes!r}")
            axes = tuple(axes)
        unknown = [a for a in mesh_axes(axes) if a not in MESH_AXES]
        if unknown:
            raise bad(f"entry {(name, axes)!r} names the unknown mesh axis {unknown[0]!r}")
        rules.append((name, axes))
    missing = [name for name in LOGICAL_AXIS_NAMES if name not in {n for n, _ in rules}]
    if missing:
        raise bad(
            f"no rule for the logical axis name(s) {', '.join(missing)} (every declared name "
            "needs one; use None to replicate)"
        )
    return tuple(rules)


# ------------------------------------------------------------------------------------------------
# Logical names -> PartitionSpec / NamedSharding
# ------------------------------------------------------------------------------------------------


def mesh_axes(axes: MeshAxes) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, a name or a tuple of names)."""
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _fit_axes(axes: MeshAxes, dim: int | None, mesh: Mesh | None, where: str) -> MeshAxes:
    """Drops mesh axes absent from ``mesh``, then trailing axes until their size divides ``dim``."""
    chosen = mesh_axes(axes)
    if mesh is None:
        return axes
    chosen = tuple(a for a in chosen if a in mesh.shape)
    if dim is not None:
        full = chosen
        while chosen and dim % math.prod(mesh.shape[a] for a in chosen):
            chosen = chosen[:-1]
        if chosen != full:
            logger.warning(
                "%s: dimension %d is not divisible by mesh axes %s (sizes %s); using %s",
                where,
                dim,
                full,
                [mesh.shape[a] for a in full],
                chosen or "replication",
            )
    if not chosen:
        return None
    return chosen[0] if len(chosen) == 1 else chosen


def logical_to_spec(
    logical_names: Sequence[str | None] | None,
    rules: LogicalRules = DEFAULT_RULES,
    *,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
) -> PartitionSpec:
    """PartitionSpec of an array whose dimensions carry ``logical_names`` under ``rules``.

    Unknown names (and ``None``) are replicated. With ``shape`` and ``mesh``, mesh axes missing
    from the mesh are dropped and non-divisible dimensions fall back as the module docstring says.
    """
    if logical_names is None:
        return PartitionSpec()
    if shape is not None and len(shape) != len(logical_names):
        raise ValueError(
            f"logical names {tuple(logical_names)} do not match the array rank {len(shape)} "
            f"(shape {tuple(shape)})"
        )
    spec = linen_spmd.logical_to_mesh_axes(tuple(logical_names), list(rules))
    fitted = [
        _fit_axes(axes, None if shape is None else shape[i], mesh, f"{tuple(logical_names)}")
        for i, axes in enumerate(spec)
    ]
    return PartitionSpec(*fitted)


def logical_sharding(
    logical_names: Sequence[str | None] | None,
    mesh: Mesh,
    rules: LogicalRules = DEFAULT_RULES,
    shape: Sequence[int] | None = None,
) -> NamedSharding:
    """NamedSharding on ``mesh`` for an array named ``logical_names`` (:func:`logical_to_spec`)."""
    return NamedSharding(mesh, logical_to_spec(logical_names, rules, shape=shape, mesh=mesh))


def variable_logical_names(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names an NNX Variable was annotated with (``out_sharding`` metadata)."""
    names = variable.get_metadata().get("out_sharding")
    if names is None:
        return None
    if isinstance(names, PartitionSpec | NamedSharding):
        raise ValueError(
            f"Variable {type(variable).__name__} carries a concrete sharding {names!r}; annotate "
            "parameters with logical names, e.g. nnx.with_partitioning(init, ('embed', 'mlp'))"
        )
    return tuple(names)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(tree: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
    """NamedShardings for every array of ``tree`` (same structure), from its logical annotations.

    ``tree`` may hold ``nnx.Variable`` leaves (an ``nnx.State``, an optax state over one, ...),
    concrete arrays or ``ShapeDtypeStruct``; leaves without logical names are replicated. The
    result can be passed as ``out_shardings`` / ``in_shardings`` of ``jax.jit`` for that tree.
    """

    def one(path, leaf):
        where = jax.tree_util.keystr(path)
        if _is_variable(leaf):
            value = leaf.get_value()
            if not jax.tree.leaves(value):  # optax.MaskedNode (optax.partition): no array
                return leaf
            names = variable_logical_names(leaf)
            shape = getattr(value, "shape", None)
            spec = logical_to_spec(names, rules, shape=shape, mesh=mesh) if names else None
            if names and shape is not None:
                _check_rank(names, shape, where)
            return leaf.replace(NamedSharding(mesh, spec or PartitionSpec()))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_variable)


def _check_rank(names: Sequence[Any], shape: Sequence[int], where: str) -> None:
    if len(names) != len(shape):
        raise ValueError(f"{where}: logical names {tuple(names)} do not match shape {tuple(shape)}")


def partition_specs(tree: Any) -> Any:
    """The ``.sharding.spec`` of every array leaf of ``tree`` (Variables unwrapped), for tests."""
    return jax.tree.map(lambda x: x.sharding.spec, unbox(tree))


def unbox(tree: Any) -> Any:
    """Replaces every ``nnx.Variable`` in ``tree`` by its value (a tree of plain arrays)."""
    return jax.tree.map(
        lambda x: x.get_value() if _is_variable(x) else x, tree, is_leaf=_is_variable
    )


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves carrying REAL shardings (an Orbax restore target).

    ``nnx.eval_shape`` may drop shardings (flax#5110); a target built here always has them.
    """

    def one(x, s):
        if _is_variable(x):
            value = x.get_value()
            if not jax.tree.leaves(value):  # optax.MaskedNode (optax.partition): no array
                return x
            return x.replace(one(value, s.get_value() if _is_variable(s) else s))
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    return jax.tree.map(one, tree, shardings, is_leaf=_is_variable)


# ------------------------------------------------------------------------------------------------
# Directly-sharded creation
# ------------------------------------------------------------------------------------------------


def abstract_state(
    init_fn: Callable[[], Any], mesh: Mesh, rules: LogicalRules = DEFAULT_RULES
) -> tuple[nnx.GraphDef, Any, Any]:
    """``(graphdef, abstract_state, shardings)`` of the NNX object(s) ``init_fn`` builds.

    Nothing is allocated: shapes come from ``nnx.eval_shape``. ``abstract_state`` holds
    ``ShapeDtypeStruct`` values with the shardings attached (usable as an Orbax restore target).
    """
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(init_fn)
    graphdef, state = nnx.split(abstract)
    shardings = state_shardings(state, mesh, rules)
    return graphdef, abstract_with_shardings(state, shardings), shardings


def sharded_initializer(
    init_fn: Callable[[], Any], mesh: Mesh, rules: LogicalRules = DEFAULT_RULES
) -> tuple[Callable[[], Any], nnx.GraphDef, Any]:
    """``(jitted_init, graphdef, shardings)``: ``jitted_init()`` returns the state of
    ``init_fn()`` with every array created in its sharding (``out_shardings``), never whole on
    one device. Exposed so callers can inspect its compiled memory; most use
    :func:`create_sharded_state`.
    """
    graphdef, _, shardings = abstract_state(init_fn, mesh, rules)
    jitted_init = jax.jit(lambda: split_state_of(init_fn), out_shardings=shardings)
    return jitted_init, graphdef, shardings


def split_state_of(init_fn: Callable[[], Any]) -> Any:
    """The state of ``init_fn()``, for tracing under a jit whose out_shardings place it (eager
    sharding at creation would bypass the rules' divisibility fallback)."""
    with nnx.use_eager_sharding(False):
        return nnx.split(init_fn())[1]


def create_sharded_state(
    init_fn: Callable[[], Any], mesh: Mesh, rules: LogicalRules = DEFAULT_RULES
) -> tuple[nnx.GraphDef, Any]:
    """``(graphdef, state)`` of ``init_fn()``, each array created directly in its sharding.

    ``init_fn`` (no arguments, deterministic: seed its ``nnx.Rngs`` inside) is traced once for
    shapes and once under ``jax.jit(out_shardings=...)``, so no array is ever materialised whole on
    one device.
    """
    jitted_init, graphdef, _ = sharded_initializer(init_fn, mesh, rules)
    with activate(mesh, rules):
        state = jitted_init()
    return graphdef, state


def create_sharded(
    init_fn: Callable[[], Any], mesh: Mesh, rules: LogicalRules = DEFAULT_RULES
) -> Any:
    """The NNX module / train-state object ``init_fn()`` returns, created directly sharded."""
    graphdef, state = create_sharded_state(init_fn, mesh, rules)
    return nnx.merge(graphdef, state)


def shard_tree(tree: Any, shardings: Any) -> Any:
    """Moves an existing tree (small, or already distributed) onto ``shardings``."""
    return jax.tree.map(jax.device_put, tree, shardings, is_leaf=_is_variable)


# ------------------------------------------------------------------------------------------------
# Data and activations
# ------------------------------------------------------------------------------------------------


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes (of :data:`BATCH_AXES`) present in ``mesh`` that split the batch dimension."""
    return tuple(a for a in BATCH_AXES if a in mesh.shape)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a data array: leading (batch) dimension over ``('data', 'fsdp')``, rest whole."""
    axes = batch_axes(mesh)
    return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def shard_batch(local_batch: Any, mesh: Mesh) -> Any:
    """Global batch ``jax.Array`` from each process's own rows (via process-local data).

    Single process: ``local_batch`` is the whole batch. Several processes: each passes its own
    contiguous share of the global batch; the global batch size must divide the batch axes' size.
    """
    sharding = batch_sharding(mesh)
    size = math.prod(mesh.shape[a] for a in batch_axes(mesh))

    def one(x):
        x = np.asarray(x)
        global_rows = x.shape[0] * jax.process_count()
        if global_rows % size:
            raise ValueError(
                f"global batch size {global_rows} is not divisible by the {size} devices of the "
                f"batch axes {batch_axes(mesh)}; choose a multiple of {size}"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(one, local_batch)


def process_batch_rows(mesh: Mesh, global_batch_size: int) -> slice:
    """The contiguous rows of the global batch that THIS process must feed to :func:`shard_batch`.

    Every process reads only its own shard of the data; this says which one, from the devices the
    process owns on the batch axes.
    """
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
    starts = [index[0].start or 0 for index in index_map.values()]
    stops = [
        global_batch_size if index[0].stop is None else index[0].stop
        for index in index_map.values()
    ]
    rows = slice(min(starts), max(stops))
    if (rows.stop - rows.start) * jax.process_count() != global_batch_size:
        raise ValueError(
            f"the batch rows of process {jax.process_index()} ({rows}) are not one contiguous "
            f"1/{jax.process_count()} of the global batch {global_batch_size}; order the mesh "
            "devices by process along the batch axes"
        )
    return rows


@contextlib.contextmanager
def activate(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Iterator[None]:
    """Sets ``mesh`` and the logical ``rules`` for tracing: wrap ``jax.jit`` calls / tracing in it.

    :func:`with_logical_constraint` reads both. The rules are read at TRACE time; jit's cache does
    not see them, so build one step function per (mesh, rules) pair.
    """
    with jax.set_mesh(mesh), flax_spmd.logical_axis_rules(tuple(rules)):
        yield


def active_mesh_and_rules() -> tuple[jax.sharding.AbstractMesh, LogicalRules] | None:
    """The mesh and logical rules that :func:`activate` set for tracing, or ``None`` outside it
    (no rules or no mesh) and inside ``jax.shard_map`` (manual mesh axes: per-device code)."""
    rules = flax_spmd.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty or AxisType.Manual in mesh.axis_types:
        return None
    return mesh, rules


def with_logical_constraint(x: jax.Array, logical_names: Sequence[str | None]) -> jax.Array:
    """Constrains an activation's sharding by logical names under the active rules and mesh.

    The one way model code constrains activations. A dimension that its mesh axes do not divide
    falls back to fewer axes (see the module docstring) instead of failing to compile. A no-op
    outside :func:`activate` (no rules or no mesh), so model code can always call it, and inside
    `jax.shard_map` (manual mesh axes: the code there is per device, as in the sampling program).
    """
    active = active_mesh_and_rules()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(logical_names, rules, shape=x.shape, mesh=mesh)
    return jax.lax.with_sharding_constraint(x, spec)
