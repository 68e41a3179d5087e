"""Passive J1939 transport protocol (J1939-21 §5.10): BAM and RTS/CTS sessions reassembled by a listener.

The reassembler never transmits. It keeps at most one session per (source, destination) pair, as
the standard allows, and at most ``max_sessions`` in all; a session ends when its last packet
arrives, on an abort, when the same sender opens a new one, or when it times out on the frames'
own clock. Malformed or hostile sequences (bad sizes, sequence numbers out of range, data without
an announcement) are dropped and counted, never raised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from agent.decode.j1939 import GLOBAL_ADDRESS

# J1939-21 §5.10.3: connection management and data transfer PGNs.
PGN_TP_CM = 0xEC00
PGN_TP_DT = 0xEB00
# TP.CM control bytes (J1939-21 §5.10.3.1-5.10.3.5).
CM_RTS = 16
CM_CTS = 17
CM_EOM_ACK = 19
CM_BAM = 32
CM_ABORT = 255
# At most 255 packets of 7 bytes (J1939-21 §5.10.1); fewer than 9 bytes fit a single frame.
MAX_SIZE = 255 * 7
MIN_SIZE = 9
# J1939-21 §5.10.2.4 timeouts: T1 750 ms between data packets, T2 1250 ms after a CTS; a receiver
# may hold the sender with CTS(0) for up to Th 500 ms at a time, which T2 covers.
T1_S = 0.75
T2_S = 1.25


class Reassembled(NamedTuple):
    """A complete multi-packet message: its PGN, sender, receiver (0xFF for BAM) and data."""

    time: float
    pgn: int
    sa: int
    da: int
    data: bytes


@dataclass
class _Session:
    pgn: int
    size: int
    packets: int
    bam: bool
    deadline: float
    chunks: dict[int, bytes] = field(default_factory=dict)


class TransportReassembler:
    """Feed it every TP.CM and TP.DT frame of one bus; it returns messages as they complete."""

    def __init__(self, max_sessions: int = 64) -> None:
        self.max_sessions = max_sessions
        self._sessions: dict[tuple[int, int], _Session] = {}  # (sa, da) of the data sender
        self.completed = 0
        self.dropped = 0  # sessions aborted, timed out, replaced or malformed

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

    def feed_cm(self, t: float, sa: int, da: int, data: bytes) -> None:
        """A TP.CM frame (PGN 0xEC00) from ``sa`` to ``da``."""
        self.expire(t)
        if len(data) < 8:
            return
        control = data[0]
        if control in (CM_RTS, CM_BAM):
            size = data[1] | (data[2] << 8)
            packets = data[3]
            pgn = data[5] | (data[6] << 8) | ((data[7] & 0x03) << 16)
            bam = control == CM_BAM
            if bam != (da == GLOBAL_ADDRESS) or not MIN_SIZE <= size <= MAX_SIZE or packets != -(-size // 7):
                self.dropped += 1
                return
            if self._sessions.pop((sa, da), None) is not None:
                self.dropped += 1  # J1939-21: a new announcement from the same sender ends the old one
            if len(self._sessions) >= self.max_sessions:
                oldest = min(self._sessions, key=lambda key: self._sessions[key].deadline)
                del self._sessions[oldest]
                self.dropped += 1
            self._sessions[(sa, da)] = _Session(pgn, size, packets, bam, t + (T1_S if bam else T2_S))
        elif control == CM_CTS:
            session = self._sessions.get((da, sa))  # the receiver sends the CTS to the data sender
            if session is not None and not session.bam:
                session.deadline = t + T2_S
        elif control == CM_ABORT:
            # Either side may abort: drop the session in whichever direction it runs.
            for key in ((sa, da), (da, sa)):
                if self._sessions.pop(key, None) is not None:
                    self.dropped += 1

    def feed_dt(self, t: float, sa: int, da: int, data: bytes) -> Reassembled | None:
        """A TP.DT frame (PGN 0xEB00); returns the message when this packet completes it."""
        self.expire(t)
        session = self._sessions.get((sa, da))
        if session is None or len(data) < 2:
            return None
        seq = data[0]
        if not 1 <= seq <= session.packets:
            del self._sessions[(sa, da)]
            self.dropped += 1
            return None
        session.chunks[seq] = bytes(data[1:8])
        session.deadline = t + (T1_S if session.bam else T2_S)
        if len(session.chunks) < session.packets:
            return None
        del self._sessions[(sa, da)]
        payload = b"".join(session.chunks[i] for i in range(1, session.packets + 1))
        if len(payload) < session.size:
            self.dropped += 1  # a short final packet: the announced size never arrived
            return None
        self.completed += 1
        return Reassembled(t, session.pgn, sa, da, payload[: session.size])

    def expire(self, now: float) -> int:
        """Drop sessions whose timeout passed before ``now``; returns how many."""
        if not self._sessions:
            return 0
        stale = [key for key, session in self._sessions.items() if session.deadline < now]
        for key in stale:
            del self._sessions[key]
        self.dropped += len(stale)
        return len(stale)
