"""The client axis: stacking and unstacking clients, count checks, per-client gradients, and the
mesh that carries the client axis.

Consensus optimizers keep one copy of the weights per client: every leaf of params, gradients,
dual variables and batches has a leading client axis ``[m, ...]``. On a device mesh that axis is
split over one mesh axis (default ``"clients"``); each device holds ``m / n_devices`` clients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from admm_jax._checks import check_int

CLIENT_AXIS = "clients"


def client_count(tree: Any, name: str = "tree") -> int:
    """The common leading (client) dimension ``m`` of every leaf of ``tree``.

    Raises:
        ValueError: ``tree`` has no leaves, a 0-d leaf, or leaves with different leading sizes.
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not leaves:
        raise ValueError(f"{name} has no leaves: expected arrays with a leading client axis")
    sizes = {}
    for path, leaf in leaves:
        if np.ndim(leaf) == 0:
            raise ValueError(f"{name}{jax.tree_util.keystr(path)} is 0-d: every leaf needs a "
                             "leading client axis [m, ...]")
        sizes.setdefault(int(np.shape(leaf)[0]), jax.tree_util.keystr(path))
    if len(sizes) > 1:
        found = ", ".join(f"{m} at {name}{path}" for m, path in sizes.items())
        raise ValueError(f"the leaves of {name} disagree on the client count: {found}")
    return next(iter(sizes))


def check_clients(**trees: Any) -> int:
    """The client count shared by every keyword tree (``check_clients(params=p, batch=b)``).

    Raises:
        ValueError: naming the trees whose client counts differ.
    """
    counts = {name: client_count(tree, name) for name, tree in trees.items()}
    if len(set(counts.values())) > 1:
        found = ", ".join(f"{name}: {m}" for name, m in counts.items())
        raise ValueError(f"client counts differ ({found}); every tree needs the same leading "
                         "client axis")
    return next(iter(counts.values()))


def stack_clients(tree: Any, m: int) -> Any:
    """``m`` copies of ``tree`` along a new leading client axis (every client starts from the
    same model, as the consensus optimizers expect)."""
    m = check_int("m", m, 1)
    return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (m, *np.shape(x))), tree)


def unstack_clients(tree: Any) -> list[Any]:
    """The ``m`` per-client trees of a client-stacked ``tree`` (inverse of stacking)."""
    m = client_count(tree)
    return [jax.tree_util.tree_map(lambda x, i=i: x[i], tree) for i in range(m)]


def consensus_params(params: Any) -> Any:
    """The global model ``w`` from client-stacked params.

    The consensus optimizers return updates that put the consensus point ``w`` on every client
    row (:func:`admm_jax.pisa.scale_by_pisa`), so after any update this is row 0.
    """
    client_count(params, "params")
    return jax.tree_util.tree_map(lambda x: x[0], params)


def client_mesh(devices: Sequence[jax.Device] | None = None,
                axis_name: str = CLIENT_AXIS) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all) whose single axis carries the clients."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("client_mesh needs at least one device")
    return Mesh(np.asarray(devices), (axis_name,))


def check_mesh(m: int, mesh: Mesh, axis_name: str = CLIENT_AXIS) -> int:
    """The number of devices on ``axis_name``, after checking that it divides ``m`` clients.

    Raises:
        ValueError: ``axis_name`` is not a mesh axis, or ``m`` is not a multiple of its size.
    """
    if axis_name not in mesh.shape:
        raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh "
                         f"{tuple(mesh.axis_names)}")
    n = mesh.shape[axis_name]
    if m % n:
        raise ValueError(f"{m} clients do not divide over the {n} devices of mesh axis "
                         f"{axis_name!r}; use a multiple of {n} clients")
    return n


def client_specs(tree: Any, axis_name: str = CLIENT_AXIS) -> Any:
    """Partition specs: the leading axis of every ≥ 1-d leaf on ``axis_name``, 0-d leaves
    replicated."""
    return jax.tree_util.tree_map(
        lambda x: PartitionSpec(axis_name) if np.ndim(x) else PartitionSpec(), tree)


def shard_clients(tree: Any, mesh: Mesh, axis_name: str = CLIENT_AXIS) -> Any:
    """Place ``tree`` on ``mesh`` with the client axis split over ``axis_name``."""
    check_mesh(client_count(tree), mesh, axis_name)
    return jax.tree_util.tree_map(
        lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec)), tree,
        client_specs(tree, axis_name))


def client_value_and_grad(loss_fn: Callable[..., Any], has_aux: bool = False
                          ) -> Callable[..., tuple[Any, Any]]:
    """Per-client losses and gradients, each client's at its own params row.

    ``loss_fn(params_i, batch_i, *args)`` is one client's loss; the result maps
    ``(params [m, ...], batch [m, ...], *args) -> (values [m] (or (values, aux)), grads [m, ...])``
    with ``grads[i] = ∇ loss_fn(params[i], batch[i])``. With the consensus optimizers every row
    of params is the global point ``w``, so this is the gradient ``∇F_i(w; B_i)`` the PISA
    local step linearises at. The client counts of params and batch are checked first (at trace
    time; shapes are static).

    Raises:
        ValueError: params and batch have different client counts.
    """
    def value_and_grad(params, batch, *args):
        check_clients(params=params, batch=batch)
        one = jax.value_and_grad(lambda p, b: loss_fn(p, b, *args), has_aux=has_aux)
        return jax.vmap(one)(params, batch)

    return value_and_grad
