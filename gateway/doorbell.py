"""The gateway's side of ringing, for one Twilio socket (shared/redisio.py, `MultiReader`).

The worker that owns the call reads `in` in its blocked read until the gateway says, with an
`IN_RING` entry naming it, that it rings the worker's wake stream after every batch; the gateway
does the same for `out` when the owner says so with `OUT_RING`. A new owner (`own`) may not ring
(another version), so `out` goes back to the blocked read until it says it does; its `own` names
it (`w`), and the gateway then rings it and tells it. Entries are untrusted: a ring names only a
plausible process id, and an `OUT_RING` counts only if it names this gateway.
"""

from __future__ import annotations

from gateway.state import GatewayState
from shared import streams as S


class Doorbell:
    def __init__(self, st: GatewayState, in_key: str, out_key: str) -> None:
        self._st = st
        self._in_key = in_key
        self._out_key = out_key
        self._owner: str | None = None

    def owner(self, raw: object) -> None:
        """Ring the worker `raw` names (the record's `owner`, an `own` entry's `w`) from now on,
        and say so on `in`; stop ringing when it names none."""
        st = self._st
        if not st.keys.rings:
            return
        owner = S.ring_target(raw)
        self._owner = owner
        st.writer.ring(self._in_key, st.keys.wake(S.worker_reader(owner)) if owner else None)
        if owner:
            st.writer.xadd(self._in_key, S.entry(S.IN_RING, value=owner), st.settings.stream_maxlen)

    def new_owner(self, fields: dict[bytes, bytes]) -> None:
        """An `own` entry the fence admitted: `out` has a new writer, which may not ring."""
        self._st.hub.ring(self._out_key, False)
        self.owner(fields.get(b"w"))

    def rung(self, fields: dict[bytes, bytes]) -> None:
        """An `OUT_RING` entry from the current owner: does it ring us?"""
        self._st.hub.ring(self._out_key, fields.get(b"v") == self._st.process_id.encode())

    def close(self) -> None:
        """The socket is gone and no other of this call's took its place here: ring no more."""
        if self._owner is not None:
            self._st.writer.ring(self._in_key, None)
