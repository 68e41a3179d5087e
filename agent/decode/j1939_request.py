"""J1939 requests (J1939-21 §5.4.2, Request PGN 59904): which on-request parameter group to ask for, and when.

Pure, like the OBD-II poller (:class:`agent.decode.obd.ObdPoller`): the caller passes the monotonic
clock, sends what :meth:`J1939Requester.next_request` returns, and tells the requester what the bus
carried (:meth:`J1939Requester.heard` for a parameter group seen, single frame or reassembled,
:meth:`J1939Requester.acknowledgement` for an Acknowledgment frame). The answers themselves are
decoded by the passive paths like any other frame; this module only decides what to send.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from agent.decode.j1939 import GLOBAL_ADDRESS, make_id

log = logging.getLogger(__name__)

# J1939-21 §5.4.2 Request, §5.4.4 Acknowledgment (PDU1: PF 0xEA / 0xE8, PS the destination).
PGN_REQUEST = 0xEA00
PGN_ACK = 0xE800
# J1939-21 §5.4.2: the Request's default priority.
REQUEST_PRIORITY = 6
# J1939-21 §5.4.4 control byte: negative acknowledgement, access denied (1 and 2); 0 ACK and 3
# "cannot respond" (busy) leave the retry schedule as it is.
ACK_REFUSED = frozenset((1, 2))
# J1939-81: 254 is the null address (a node without an address may send nothing but Address
# Claimed / Cannot Claim); 255 is the global destination, never a source.
NULL_ADDRESS = 0xFE
# J1939-21 §5.12.3: a responder answers within Tr 200 ms, a requester waits T3 1250 ms before it
# may conclude that no answer comes; retries are never closer than that.
RESPONSE_TIMEOUT_S = 1.25
# At most two requests a second from the agent, however many parameter groups are unanswered.
REQUEST_GAP_S = 0.5


def request_frame(pgn: int, sa: int, da: int = GLOBAL_ADDRESS) -> tuple[int, bytes]:
    """The 29-bit id and 3 data bytes of a Request for ``pgn`` from ``sa`` to ``da``.

    J1939-21 §5.4.2: priority 6, PDU1 (PF 0xEA, PS the destination), data the requested PGN
    least significant byte first. Raises ValueError for a source address that may not request.
    """
    if not 0 <= sa < NULL_ADDRESS:
        raise ValueError(f"source address {sa} may not send a request (0-253 only)")
    return make_id(PGN_REQUEST, sa, REQUEST_PRIORITY, da), pgn.to_bytes(3, "little")


@dataclass
class _Wanted:
    refresh_s: float  # ask again this long after an answer; 0: never
    next_due: float = 0.0  # monotonic seconds; inf: not asked for again
    wait_s: float = 0.0  # the retry interval after the next unanswered request
    answered: bool = False
    requests: int = 0


class J1939Requester:
    """Asks for each wanted PGN at start, again with capped exponential backoff until it is seen,
    then every ``refresh_s`` (or never, for 0); at most one request every ``REQUEST_GAP_S``.

    ``wanted`` maps PGN -> refresh period in seconds. Requests go from ``sa`` to ``da`` (255:
    global, every ECU that has the PGN answers). An answer counts from any source for a global
    request, only from ``da`` otherwise; a PGN broadcast on its own counts as answered too, so a
    vehicle that sends it anyway is never asked. A negative acknowledgement (or access denied)
    from ``da`` drops the PGN. The backoff has no jitter: one requester per bus, nothing to
    de-synchronise.
    """

    def __init__(self, wanted: dict[int, float], sa: int, da: int = GLOBAL_ADDRESS, retry_s: float = 5.0,
                 retry_max_s: float = 300.0) -> None:
        request_frame(0, sa, da)  # validates the addresses
        self.sa, self.da = sa, da
        self.retry_s = max(retry_s, RESPONSE_TIMEOUT_S)
        self.retry_max_s = max(retry_max_s, self.retry_s)
        self._wanted = {pgn: _Wanted(refresh_s, wait_s=self.retry_s) for pgn, refresh_s in wanted.items()}
        self._quiet_until = -math.inf
        self.refused: set[int] = set()
        # PGNs whose frames the caller passes to heard() / acknowledgement().
        self.watched = frozenset(self._wanted) | {PGN_ACK}

    @property
    def answered(self) -> set[int]:
        """The PGNs seen at least once."""
        return {pgn for pgn, w in self._wanted.items() if w.answered}

    def requests(self, pgn: int) -> int:
        """How many requests for ``pgn`` were handed out."""
        return self._wanted[pgn].requests

    def next_request(self, now: float) -> tuple[int, bytes] | None:
        """The (29-bit id, data) to send now, if any; call it every few hundred ms at most."""
        if now < self._quiet_until:
            return None
        due = [(w.next_due, pgn) for pgn, w in self._wanted.items() if w.next_due <= now]
        if not due:
            return None
        _, pgn = min(due)
        w = self._wanted[pgn]
        # Asked again after wait_s unless heard() moves next_due first.
        w.next_due = now + w.wait_s
        w.wait_s = min(w.wait_s * 2, self.retry_max_s)
        w.requests += 1
        self._quiet_until = now + REQUEST_GAP_S
        return request_frame(pgn, self.sa, self.da)

    def heard(self, pgn: int, sa: int, now: float) -> None:
        """The bus carried ``pgn`` from ``sa`` (a single frame, or a message the transport protocol completed)."""
        w = self._wanted.get(pgn)
        if w is None or (self.da != GLOBAL_ADDRESS and sa != self.da) or pgn in self.refused:
            return
        if not w.answered:
            log.info("J1939 PGN %d answered by %02X after %d request(s)", pgn, sa, w.requests)
        w.answered = True
        w.wait_s = self.retry_s
        w.next_due = now + w.refresh_s if w.refresh_s > 0 else math.inf

    def acknowledgement(self, sa: int, da: int, data: bytes) -> None:
        """An Acknowledgment frame (PGN 59392) from ``sa`` to ``da``: a refusal from the destination drops the PGN.

        J1939-21 §5.4.4: byte 1 the control byte, byte 5 the address acknowledged (0xFF in older
        revisions), bytes 6-8 the PGN. ECUs do not NACK global requests (§5.4.2), so only a
        destination-specific request can be refused.
        """
        if (sa != self.da or da not in (self.sa, GLOBAL_ADDRESS) or len(data) < 8 or data[0] not in ACK_REFUSED
                or data[4] not in (self.sa, GLOBAL_ADDRESS)):
            return
        pgn = int.from_bytes(data[5:8], "little")
        w = self._wanted.get(pgn)
        if w is None or pgn in self.refused:
            return
        self.refused.add(pgn)
        w.next_due = math.inf
        log.info("J1939 PGN %d refused by %02X (acknowledgement control %d): not asked again", pgn, sa, data[0])
