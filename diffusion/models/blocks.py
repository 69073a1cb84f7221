"""A stack of identical blocks, optionally scanned (`nnx.scan`) and rematerialised, and the
helpers that scanned stacks need: merging a module in the current trace and copying the
parameters of an unscanned stack into a scanned one."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

REMAT_POLICIES = {
    "none": None,  # no rematerialisation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute everything in the backward pass
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


def resolve_remat_policy(name: str):
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; valid: {sorted(REMAT_POLICIES)}")
    return REMAT_POLICIES[name]


class BlockStack(nnx.Module):
    """`depth` blocks applied in order, `x = block(x, *args)`.

    scan_layers=True creates the blocks with `nnx.vmap` and runs them with `nnx.scan`, so compile
    time does not grow with depth; parameters then have a leading 'layers' axis.
    remat_policy (see REMAT_POLICIES) wraps each block in `nnx.remat`.
    """

    def __init__(
        self,
        make_block: Callable[[nnx.Rngs], nnx.Module],
        depth: int,
        *,
        scan_layers: bool = False,
        remat_policy: str = "none",
        rngs: nnx.Rngs,
    ):
        resolve_remat_policy(remat_policy)
        self.depth = depth
        self.scan_layers = scan_layers
        self.remat_policy = remat_policy
        if scan_layers:

            @nnx.split_rngs(splits=depth)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def create(rngs):
                return make_block(rngs)

            self.blocks = create(rngs)
        else:
            self.blocks = nnx.List([make_block(rngs) for _ in range(depth)])

    def __call__(self, x: jax.Array, *args) -> jax.Array:
        def apply(block, x):
            return block(x, *args)

        if self.remat_policy != "none":
            apply = nnx.remat(apply, policy=REMAT_POLICIES[self.remat_policy])
        if self.scan_layers:

            @nnx.scan(
                in_axes=(0, nnx.Carry),
                out_axes=nnx.Carry,
                transform_metadata={nnx.PARTITION_NAME: "layers"},
            )
            def scan_body(block, x):
                return apply(block, x)

            return scan_body(self.blocks, x)
        for block in self.blocks:
            x = apply(block, x)
        return x


def merge_here(graphdef: nnx.GraphDef, state) -> nnx.Module:
    """`nnx.merge` with variables made anew in the current trace. A module whose state comes
    from an outer trace (a closure inside value_and_grad, lax.map or a sampler's lax.scan)
    fails in nnx.scan with "different trace level" when its blocks are scanned; the identity
    map over the state costs nothing in the compiled program."""
    return nnx.merge(graphdef, jax.tree.map(lambda value: value, state))


def copy_params_into_scanned(unscanned: nnx.Module, scanned: nnx.Module) -> None:
    """Copy the parameters of a model built with scan_layers=False into the same model built
    with scan_layers=True, stacking block i's parameters at index i of the 'layers' axis."""
    source = {
        path: variable.get_value()
        for path, variable in nnx.to_flat_state(nnx.state(unscanned, nnx.Param))
    }
    updated = []
    for path, variable in nnx.to_flat_state(nnx.state(scanned, nnx.Param)):
        stack_at = next(
            (i + 2 for i in range(len(path) - 1) if path[i : i + 2] == ("blocks", "blocks")), None
        )
        if stack_at is None:
            value = source[path]
        else:
            depth = variable.get_value().shape[0]
            value = jnp.stack(
                [source[(*path[:stack_at], i, *path[stack_at:])] for i in range(depth)]
            )
        updated.append((path, variable.replace(value)))
    nnx.update(scanned, nnx.from_flat_state(updated))
