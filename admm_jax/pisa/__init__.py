"""PISA / SISA / NSISA: preconditioned inexact stochastic consensus ADMM (Zhou et al., 2025).

Optax optimizers over params with a leading client axis ``[m, ...]``:

* :func:`pisa`, :func:`sisa`, :func:`nsisa` — the three variants; :func:`scale_by_pisa` — the
  core with any :class:`Preconditioner` (:func:`identity`, :func:`second_moment`,
  :func:`orthogonalized`); :class:`ConsensusState`; the σ schedule (:func:`sigma_schedule`,
  :func:`sigma_interval_for`);
* :func:`newton_schulz`, :func:`soft_orthogonalize` — Muon's quintic iteration and its
  softened form used by NSISA;
* the client axis: :func:`stack_clients`, :func:`unstack_clients`, :func:`consensus_params`,
  :func:`client_value_and_grad`, :func:`check_clients`, and the mesh (:func:`client_mesh`,
  :func:`shard_clients`, :func:`client_specs`).

A federated step::

    params = stack_clients(model_params, m)
    tx = sisa(sigma=1.0, rho=100.0)
    state = tx.init(params)
    losses, grads = client_value_and_grad(loss_fn)(params, batches)   # batches [m, ...]
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)                       # every row = w
    global_model = consensus_params(params)
"""

from admm_jax.pisa.clients import (
    CLIENT_AXIS,
    check_clients,
    check_mesh,
    client_count,
    client_mesh,
    client_specs,
    client_value_and_grad,
    consensus_params,
    shard_clients,
    stack_clients,
    unstack_clients,
)
from admm_jax.pisa.consensus import (
    ConsensusState,
    nsisa,
    pisa,
    scale_by_pisa,
    sigma_interval_for,
    sigma_schedule,
    sisa,
)
from admm_jax.pisa.preconditioners import (
    NS_BAND,
    NS_COEFFS,
    Preconditioner,
    identity,
    newton_schulz,
    orthogonalized,
    second_moment,
    soft_orthogonalize,
)

__all__ = [
    "CLIENT_AXIS",
    "NS_BAND",
    "NS_COEFFS",
    "ConsensusState",
    "Preconditioner",
    "check_clients",
    "check_mesh",
    "client_count",
    "client_mesh",
    "client_specs",
    "client_value_and_grad",
    "consensus_params",
    "identity",
    "newton_schulz",
    "nsisa",
    "orthogonalized",
    "pisa",
    "scale_by_pisa",
    "second_moment",
    "shard_clients",
    "sigma_interval_for",
    "sigma_schedule",
    "sisa",
    "soft_orthogonalize",
    "stack_clients",
    "unstack_clients",
]
