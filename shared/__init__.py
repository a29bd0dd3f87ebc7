"""Code both tiers share: protocols, audio, Redis, settings, serving.

Importing the package keeps numpy's BLAS on the calling thread. numpy's OpenBLAS otherwise starts
a thread per core and parks them spinning: once the worker's resampler batched a read's frames
across calls into one matrix product, OpenBLAS threaded it, and at 100 calls its spinning thread
took as much CPU as the worker itself (docs/performance.md, "BLAS threads"). Our products are
small; one thread does them fastest. The variable is read when numpy loads, so every package
that reaches numpy imports this one first (worker, gateway, callbridge, sim).
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
