"""Device meshes: a config's or a caller's axis sizes -> a `jax.sharding.Mesh` over the devices.

Building a mesh is about devices (how many, which slices and chips, their physical order); it
knows nothing of logical axis names or rules, which `diffusion/sharding.py` maps onto a mesh once
it exists. The axes of a config's mesh are `sharding.MESH_AXES`, in that order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from diffusion.errors import UserError
from diffusion.sharding import MESH_AXES


def resolve_mesh_shape(mesh_shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Replaces the single ``-1`` entry of ``mesh_shape`` so the sizes multiply to ``num_devices``.

    Raises:
      ValueError: naming the shape and the device count, if the sizes are not positive integers
        (or one -1), or cannot multiply to the device count.
    """
    if not isinstance(mesh_shape, Mapping) or not mesh_shape:
        raise ValueError(
            f"mesh_shape must be a non-empty dict of axis name -> size, e.g. "
            f"{{'data': -1, 'fsdp': 1, 'tensor': 1}}; got {mesh_shape!r}"
        )
    sizes = dict(mesh_shape)
    bad = {
        k: v for k, v in sizes.items() if not isinstance(v, int | np.integer) or v == 0 or v < -1
    }
    if bad:
        raise ValueError(
            f"mesh_shape {sizes} has invalid sizes {bad}: each must be a positive int or -1"
        )
    fill = [k for k, v in sizes.items() if v == -1]
    if len(fill) > 1:
        raise ValueError(
            f"mesh_shape {sizes} has several -1 entries {fill}; at most one is allowed"
        )
    known = math.prod(v for v in sizes.values() if v != -1)
    if fill:
        if num_devices % known:
            raise ValueError(
                f"mesh_shape {sizes} cannot fit {num_devices} devices: the fixed sizes multiply to "
                f"{known}, which does not divide {num_devices}"
            )
        sizes[fill[0]] = num_devices // known
    elif known != num_devices:
        raise ValueError(
            f"mesh_shape {sizes} has {known} devices but {num_devices} are available; make the "
            f"sizes multiply to {num_devices} or set one axis to -1"
        )
    return sizes


def _num_slices(devices: Sequence[Any]) -> int:
    return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(
    mesh_shape: Mapping[str, int],
    devices: Sequence[Any] | None = None,
    dcn_mesh_shape: Mapping[str, int] | None = None,
) -> Mesh:
    """Builds a mesh with GSPMD-style ``Auto`` axes, in the order of ``mesh_shape``'s keys.

    Args:
      mesh_shape: axis name -> size; one size may be -1 to take the remaining devices. With
        ``dcn_mesh_shape`` these are the sizes WITHIN one slice (ICI) and the mesh axis size is the
        product of both.
      devices: the devices to use (default: all, ``jax.devices()``); a subset gives a sub-mesh.
      dcn_mesh_shape: axis name -> number of slices along that axis (over the data-center
        network). Default: ``None``, or ``{first_axis: num_slices}`` when the devices span several
        TPU slices. On hosts without slices (CPU / GPU), each process is one granule.

    Raises:
      ValueError: when the shapes do not fit the device count (the message names both).
    """
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(mesh_shape)
    slices = _num_slices(devices)
    if dcn_mesh_shape is None and slices > 1:
        dcn_mesh_shape = {names[0]: slices}
    if dcn_mesh_shape:
        unknown = set(dcn_mesh_shape) - set(names)
        if unknown:
            raise ValueError(
                f"dcn_mesh_shape {dict(dcn_mesh_shape)} names axes {sorted(unknown)} that are not "
                f"in mesh_shape {dict(mesh_shape)}"
            )
        dcn = [int(dcn_mesh_shape.get(n, 1)) for n in names]
        granules = math.prod(dcn)
        if granules < 1 or len(devices) % granules:
            raise ValueError(
                f"dcn_mesh_shape {dict(dcn_mesh_shape)} asks for {granules} slices/processes, "
                f"which does not divide the {len(devices)} devices"
            )
        ici = resolve_mesh_shape(mesh_shape, len(devices) // granules)
        device_array = mesh_utils.create_hybrid_device_mesh(
            [ici[n] for n in names],
            dcn,
            devices=devices,
            process_is_granule=slices <= 1,
            allow_split_physical_axes=True,
        )
    else:
        sizes = resolve_mesh_shape(mesh_shape, len(devices))
        shape = [sizes[n] for n in names]
        if len({getattr(d, "core_on_chip", 0) for d in devices}) > 1:
            # A chip's TensorCores as separate devices (v4's compile-only topology, not its
            # "megacore" mode), which mesh_utils refuses: chip by chip, a chip's cores adjacent.
            chip_major = sorted(devices, key=lambda d: (*d.coords[::-1], d.core_on_chip))
            device_array = np.asarray(chip_major, dtype=object).reshape(shape)
        else:
            try:
                device_array = mesh_utils.create_device_mesh(
                    shape, devices=devices, allow_split_physical_axes=True
                )
            except NotImplementedError:
                # Device kinds without a topology-aware layout: plain row-major order.
                device_array = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(device_array, names, axis_types=(AxisType.Auto,) * len(names))


# Mesh axes a config section may lack, with the size they then get: a config.json written before
# the axis existed describes a mesh without it.
OPTIONAL_MESH_AXES = {"sequence": 1}


def mesh_shape_from_config(mesh_config: Mapping[str, Any]) -> dict[str, int]:
    """``{axis: size}`` over :data:`MESH_AXES` from a config section (sizes may be -1)."""

    def size(axis: str) -> int:
        if axis not in mesh_config and axis in OPTIONAL_MESH_AXES:
            return OPTIONAL_MESH_AXES[axis]
        return int(mesh_config[axis])

    return {axis: size(axis) for axis in MESH_AXES}


def mesh_from_config(mesh_config: Mapping[str, Any], devices: Sequence[Any] | None = None) -> Mesh:
    """Mesh from a config section with fields ``data``, ``fsdp``, ``sequence``, ``tensor`` and
    ``dcn_data`` (``sequence`` may be absent: size 1)."""
    shape = mesh_shape_from_config(mesh_config)
    dcn_data = int(mesh_config.get("dcn_data", 1) or 1)
    dcn = {"data": dcn_data} if dcn_data > 1 else None
    try:
        return make_mesh(shape, devices=devices, dcn_mesh_shape=dcn)
    except ValueError as error:  # the config is where the user can fix it
        count = len(jax.devices() if devices is None else devices)
        raise UserError(
            f"config.mesh {shape} (dcn_data={dcn_data}) does not fit the {count} devices: "
            f"{error}. Set --config.mesh.data/fsdp/sequence/tensor to sizes that multiply to "
            f"{count}, e.g. --config.mesh.data=-1 (all remaining devices) with fsdp, sequence and "
            f"tensor dividing {count}."
        ) from error
