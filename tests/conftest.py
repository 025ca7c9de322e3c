"""Test-session settings: one BLAS thread per process (XLA already uses every core, and the
pytest-xdist workers share them; oversubscribed OpenBLAS makes small SVDs 100× slower)."""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
