"""Test-session settings: one BLAS thread per process (XLA already uses every core, and the
pytest-xdist workers share them; oversubscribed OpenBLAS makes small SVDs 100× slower)."""

import os
import subprocess
import sys

import pytest

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def smollm2():
    """The pretrained SmolLM2-135M, loaded once per test process (it takes seconds and 0.5 GB)."""
    from admm_jax.models.pretrained import load_smollm2

    return load_smollm2()


@pytest.fixture
def run_on_cpu_devices():
    """``run(script, n_devices, timeout=600) -> stdout``: run a Python script in a fresh process
    that sees ``n_devices`` fake CPU devices (``--xla_force_host_platform_device_count`` only
    takes effect before JAX starts, and this process's JAX has already started)."""

    def run(script: str, n_devices: int, timeout: int = 600) -> str:
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n_devices}",
               "JAX_PLATFORMS": "cpu"}
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              env=env, timeout=timeout)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    return run
