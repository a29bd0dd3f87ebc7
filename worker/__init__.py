"""The worker tier: each call's Vapi session, audio conversion, pacing and barge-in."""

import shared  # noqa: F401  (first: numpy's BLAS stays on one thread; see shared/__init__.py)
