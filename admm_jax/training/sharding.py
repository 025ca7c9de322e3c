"""Device meshes and shardings for data-parallel training.

The batch is split along a ``data`` mesh axis; parameters and optimizer state are replicated.
Under ``jax.jit`` XLA inserts the gradient all-reduce, so the train step is the same function on
one device or many. Test multi-device code on CPU with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all) with the single axis ``"data"``."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("data_mesh needs at least one device")
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def check_batch_divisible(batch_size: int, mesh: Mesh) -> None:
    """Raise if ``batch_size`` cannot be split evenly over the ``data`` axis."""
    n = mesh.shape[DATA_AXIS]
    if batch_size % n:
        raise ValueError(
            f"batch_size {batch_size} must be divisible by the number of devices on the "
            f"'{DATA_AXIS}' axis ({n})")


def shard_batch(batch: np.ndarray | jax.Array, mesh: Mesh) -> jax.Array:
    """Place ``batch`` with its leading (batch) dimension split over the ``data`` axis."""
    return jax.device_put(batch, NamedSharding(mesh, PartitionSpec(DATA_AXIS)))


def replicate(tree, mesh: Mesh):
    """Place every leaf of ``tree`` fully replicated on ``mesh``."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))
