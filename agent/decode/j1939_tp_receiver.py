"""The receiver's side of a J1939 RTS/CTS session sent to the agent (J1939-21 §5.10.2.1): CTS and
End of Message Acknowledgment.

An ECU answers a destination-specific request for a multi-packet parameter group (the VIN) by RTS to
the requester, then sends data only as the requester's CTS frames allow. The passive
:class:`agent.decode.j1939_tp.TransportReassembler` reassembles the data as it does for any
session; :class:`CtsResponder` only says which TP.CM frame the agent must send back, and when.
Pure: frames in, frames to send out. Used only on buses the agent may transmit on.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.decode.j1939 import make_id
from agent.decode.j1939_tp import CM_ABORT, CM_CTS, CM_EOM_ACK, CM_RTS, MAX_SIZE, MIN_SIZE, PGN_TP_CM

# J1939-21 §5.10.3: the default priority of TP.CM frames.
TP_PRIORITY = 7


@dataclass
class _Incoming:
    size: int
    packets: int
    per_cts: int  # packets the sender takes per CTS (RTS byte 5; 0xFF: no limit)
    pgn: bytes  # the 3 PGN bytes, echoed in every CTS and the acknowledgement
    window_end: int  # the sequence number whose arrival calls for the next CTS


class CtsResponder:
    """Answers RTS/CTS sessions sent to ``sa``: feed it every TP.CM and TP.DT frame to ``sa``.

    One session per sender (J1939-21 allows one per pair); a new RTS replaces it and an abort ends
    it. A lost packet leaves the window open: the sender times out (T3) and aborts, as the standard
    has it, and the request is asked again later.
    """

    def __init__(self, sa: int) -> None:
        self.sa = sa
        self._sessions: dict[int, _Incoming] = {}

    def cm(self, sender: int, da: int, data: bytes) -> tuple[int, bytes] | None:
        """A TP.CM frame from ``sender`` to ``da``; returns the CTS to send for an RTS to us."""
        if da != self.sa or len(data) < 8:
            return None
        if data[0] == CM_ABORT:
            self._sessions.pop(sender, None)
            return None
        if data[0] != CM_RTS:
            return None
        size, packets = data[1] | (data[2] << 8), data[3]
        if not MIN_SIZE <= size <= MAX_SIZE or packets != -(-size // 7):
            return None  # malformed: the passive reassembler drops it too
        per_cts = min(data[4], packets) or packets
        session = self._sessions[sender] = _Incoming(size, packets, per_cts, bytes(data[5:8]), per_cts)
        return self._cts(sender, session, per_cts, 1)

    def dt(self, sender: int, da: int, data: bytes) -> tuple[int, bytes] | None:
        """A TP.DT frame from ``sender`` to ``da``; returns the next CTS, or the acknowledgement after the last packet."""
        session = self._sessions.get(sender) if da == self.sa else None
        if session is None or not data or data[0] != session.window_end:
            return None
        if data[0] >= session.packets:
            del self._sessions[sender]
            ack = bytes([CM_EOM_ACK, session.size & 0xFF, session.size >> 8, session.packets, 0xFF]) + session.pgn
            return make_id(PGN_TP_CM, self.sa, TP_PRIORITY, sender), ack
        count = min(session.per_cts, session.packets - data[0])
        session.window_end = data[0] + count
        return self._cts(sender, session, count, data[0] + 1)

    def _cts(self, sender: int, session: _Incoming, count: int, first: int) -> tuple[int, bytes]:
        # J1939-21 §5.10.3.2: control 17, packets that may be sent, next sequence number, 2 reserved, PGN.
        return make_id(PGN_TP_CM, self.sa, TP_PRIORITY, sender), bytes([CM_CTS, count, first, 0xFF, 0xFF]) + session.pgn
