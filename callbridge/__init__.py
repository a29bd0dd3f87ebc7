"""The command line, the one-machine stack, the demo and the benches."""

import shared  # noqa: F401  (first: numpy's BLAS stays on one thread; see shared/__init__.py)
