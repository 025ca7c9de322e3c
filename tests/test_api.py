"""The public surface: top-level entry points, the README's snippets, and the layering rule
(a method's subpackage imports the shared layers only, never another method)."""

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

import admm_jax
from admm_jax.elsa.split import elsa as elsa_transform
from admm_jax.ops.projection import prune_count
from admm_jax.pruning.registry import prune as registry_prune
from admm_jax.salaad.split import slr_admm as slr_transform

PACKAGE = pathlib.Path(admm_jax.__file__).parent
SHARED = {"core", "ops", "models", "training", "data", "pruning", "adapters", "_checks", "_io"}
METHODS = {"salaad", "elsa", "sparc", "spap", "pisa"}


def _imported_packages(path: pathlib.Path) -> set[str]:
    """First component below ``admm_jax`` of every ``admm_jax.*`` import in a file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "admm_jax" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_methods_depend_on_shared_layers_only():
    checked = 0
    for method in METHODS:
        for path in (PACKAGE / method).rglob("*.py") if (PACKAGE / method).is_dir() else []:
            others = _imported_packages(path) - SHARED - {method}
            assert not others, f"{path.relative_to(PACKAGE)} imports other methods: {others}"
            checked += 1
    for layer in SHARED - {"_checks", "_io"}:
        for path in (PACKAGE / layer).rglob("*.py"):
            methods = _imported_packages(path) & METHODS
            assert not methods, f"shared {path.relative_to(PACKAGE)} imports methods {methods}"
            checked += 1
    assert checked > 20  # the walk really saw the package


def test_top_level_entry_points_are_the_method_functions():
    assert admm_jax.slr_admm is slr_transform
    assert admm_jax.elsa is elsa_transform
    assert admm_jax.prune is registry_prune
    for name in admm_jax.__all__:
        assert getattr(admm_jax, name) is not None, name


def test_readme_chains_compose_and_step():
    """The README's SALAAD and ELSA chains build, initialise and take a step on a model-shaped
    pytree; ELSA's finalize gives the exact sparsity and masked_updates keeps it."""
    key = jax.random.key(0)
    params = {"layers": {0: {"mlp": {"up_proj": {"kernel": jax.random.normal(key, (16, 24))}}}},
              "embed": {"embedding": jax.random.normal(key, (32, 16))},
              "final_norm": {"scale": jnp.ones(16)}}
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    for tx in (
        optax.chain(optax.clip_by_global_norm(1.0), admm_jax.slr_admm(rho=1e-6),
                    optax.adamw(8e-3)),
        optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-3),
                    admm_jax.slr_admm(rho=0.1, coupling="decoupled",
                                      controller=admm_jax.ControllerConfig(alpha_step=0.003,
                                                                           beta_step=0.0003))),
        optax.chain(optax.clip_by_global_norm(1.0),
                    admm_jax.elsa(0.9, rho=1e-3, interval=32,
                                  rho_schedule=admm_jax.rho_ramp("cosine", 4000, 10.0)),
                    optax.adam(1e-4)),
    ):
        state = tx.init(params)
        updates, state = tx.update(grads, state, params)
        assert jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(params)
        assert "admm/residual_mean" in admm_jax.admm_metrics(state)
    pruned, masks = admm_jax.finalize(params, state, 0.9)
    kernel = np.asarray(pruned["layers"][0]["mlp"]["up_proj"]["kernel"])
    assert (kernel == 0).sum() == prune_count(kernel.size, 0.9)
    tx_ft = optax.chain(optax.adamw(1e-5), admm_jax.masked_updates(masks))
    updates, _ = tx_ft.update(grads, tx_ft.init(pruned), pruned)
    after = np.asarray(optax.apply_updates(pruned, updates)["layers"][0]["mlp"]["up_proj"]
                       ["kernel"])
    assert np.all(after[kernel == 0] == 0)
