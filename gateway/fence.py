"""Which worker may speak on a call: the gateway's side of ownership fencing.

Every `out` entry a worker writes carries its ownership epoch (`e`); a worker that takes a call
over first writes `own` with its new, higher epoch (worker/ownership.py). The gateway keeps the
highest epoch it has seen per socket and drops entries below it, so a worker that was replaced
(frozen past its lease, then woken) cannot put a single frame in front of the caller. Entries
without an epoch (written by an older version) pass. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared import streams as S

MAX_EPOCH_DIGITS = 18


def epoch_of(fields: dict[bytes, bytes]) -> int | None:
    """The entry's epoch, or None when it has none or it is not a plain number."""
    raw = fields.get(b"e")
    if raw is None or not raw.isdigit() or len(raw) > MAX_EPOCH_DIGITS:
        return None
    return int(raw)


@dataclass
class OwnerFence:
    epoch: int = 0  # the highest owner epoch seen for this call (from the record at attach)

    def admit(self, fields: dict[bytes, bytes]) -> bool | None:
        """True: deliver the entry. False: a replaced owner wrote it, drop it. None: an `own`
        marker that raised the bar — flush what the previous owner left in Twilio's buffer."""
        epoch = epoch_of(fields)
        if fields.get(b"k") == S.OUT_OWN:
            if epoch is not None and epoch > self.epoch:
                self.epoch = epoch
                return None
            return False
        if epoch is None:
            return True
        if epoch < self.epoch:
            return False
        self.epoch = epoch
        return True
