"""The gateway tier: Twilio's webhooks and media sockets, onto per-call Redis streams."""

import shared  # noqa: F401  (first: numpy's BLAS stays on one thread; see shared/__init__.py)
