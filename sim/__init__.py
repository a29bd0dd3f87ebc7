"""Stand-ins for Twilio and Vapi that speak their documented wire protocols."""

import shared  # noqa: F401  (first: numpy's BLAS stays on one thread; see shared/__init__.py)
