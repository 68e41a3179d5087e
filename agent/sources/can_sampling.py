"""CAN frames to records, with a sampling policy per signal, driven by the frames' own timestamps.

:class:`CanSampler` is pure (no threads, devices or clocks of its own), so the live source and the
offline ``process --can FILE`` run the same code. It decides per arbitration id, once, what a
frame is for (a cached decision, "nothing" included): frames of unconfigured PGNs cost a
dictionary lookup; a signal whose policy is "latest every N s" is decoded only when due.

Emitted records:
- ``Signal(name, value, unit, source=bus)``: value None when the ECU says not available.
- ``Status(type="dm1" | "obd_dtcs", attrs=DtcSet.to_attrs())`` when an ECU's active trouble codes,
  lamps or occurrence counts change (and the first time they are seen); :meth:`CanSampler.dtc_sets`
  gives the current sets.
- ``Status(type="vin", attrs={"vin", "bus", "ecu", "protocol"})`` when a VIN is first read or changes.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

from agent.config import CanSignalConfig
from agent.decode import obd
from agent.decode.can_decoder import PGN_DM1, PGN_VI, Decoded, FrameDecoder
from agent.decode.dtc import DtcSet
from agent.decode.j1939 import J1939Database, MessageLayout, SignalLayout, pgn_of
from agent.decode.j1939_tp import PGN_TP_CM, PGN_TP_DT
from agent.record import Record, Signal, Status

# Frames routed to the general decoder instead of a cached signal plan.
_SPECIAL_PGNS = frozenset((PGN_TP_CM, PGN_TP_DT, PGN_DM1, PGN_VI))
_EXTENDED = 1 << 31  # key bit separating 29-bit from 11-bit ids in the plan cache
# A real bus carries a few hundred ids; a bus full of random ids must not grow the cache forever.
MAX_PLANS = 65536
# Rounding of OBD-II means (their formulas are not DBC scales): three decimals.
OBD_DIGITS = 3


class Policy:
    """The sampling state of one configured signal; ``add`` returns (time, value) pairs to emit."""

    always = True  # needs every value (windows, change); False: ``wants`` says when

    def __init__(self, config: CanSignalConfig, unit: str | None, scale: float | None, offset: float,
                 digits: int) -> None:
        self.config = config
        self.name = config.name or config.signal
        self.unit = unit
        self.scale, self.offset, self.digits = scale, offset, digits

    def wants(self, t: float) -> bool:
        return True

    def add(self, t: float, value: float | None) -> list[tuple[float, float | None]]:
        raise NotImplementedError

    def close(self, now: float) -> list[tuple[float, float | None]]:
        """Emit what is due by ``now`` even without a new value (a window that ended)."""
        return []


class Latest(Policy):
    """The newest value at most once per ``period_s``, decoded only when due."""

    always = False

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.next_due = -math.inf
        self.period = self.config.period_s

    def wants(self, t: float) -> bool:
        # The second test restarts the cadence after the clock stepped back by more than a period.
        return t >= self.next_due or self.next_due - t > self.period

    def add(self, t, value):
        period = self.period
        # Keep the cadence through jitter; restart it after a gap or a clock step.
        self.next_due = self.next_due + period if self.next_due <= t < self.next_due + period else t + period
        return [(t, value)]


class Window(Policy):
    """min, max or mean over consecutive windows of ``period_s``, stamped at the window's end.

    Values that are not available are left out; a window with nothing but them emits None.
    The mean is rounded to the signal's resolution (its DBC scale and offset).
    """

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.end: float | None = None
        self._reset()

    def _reset(self) -> None:
        self.count = self.missing = 0
        self.total = 0.0
        self.low = math.inf
        self.high = -math.inf

    def add(self, t, value):
        out = []
        period = self.config.period_s
        if self.end is None:
            self.end = t + period
        elif t >= self.end or t < self.end - 2 * period:  # the window ended, or the clock stepped back
            out = self._emit()
            self.end = self.end + period if self.end <= t < self.end + period else t + period
        if value is None:
            self.missing += 1
        else:
            self.count += 1
            self.total += value
            self.low = min(self.low, value)
            self.high = max(self.high, value)
        return out

    def close(self, now):
        if self.end is None or now < self.end:
            return []
        out = self._emit()
        self.end = None
        return out

    def _emit(self):
        stat = self.config.policy
        if self.count:
            value = self.low if stat == "min" else self.high if stat == "max" else self._round(self.total / self.count)
            out = [(self.end, value)]
        else:
            out = [(self.end, None)] if self.missing else []
        self._reset()
        return out

    def _round(self, mean: float) -> float:
        if self.scale:
            mean = round((mean - self.offset) / self.scale) * self.scale + self.offset
        return round(mean, self.digits)


class Change(Policy):
    """A value when it moved more than ``deadband`` from the last one emitted, or became (un)available."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.started = False
        self.last: float | None = None

    def add(self, t, value):
        last = self.last
        if self.started and (value is None) == (last is None) and (
                value is None or abs(value - last) <= self.config.deadband):
            return []
        self.started, self.last = True, value
        return [(t, value)]


POLICIES: dict[str, type[Policy]] = {"latest": Latest, "min": Window, "max": Window, "mean": Window, "change": Change}


class CanSampler:
    """Frames of one bus in, records out. ``mono(t)`` maps a frame time to the monotonic clock."""

    def __init__(self, db: J1939Database, signals: Iterable[CanSignalConfig], bus: str,
                 mono: Callable[[float], float] | None = None, obd_answers: bool = True) -> None:
        self.db = db
        self.bus = bus
        self._mono = mono or (lambda t: t)
        self._configs = list(signals)
        self._by_name: dict[str, list[tuple[CanSignalConfig, Policy]]] = {}
        self.decoder = FrameDecoder(db, obd_answers=obd_answers)
        self._plans: dict[int, object] = {}
        self._dtcs: dict[tuple[str, int], DtcSet] = {}
        self._vins: dict[tuple[str, int], str] = {}
        self.frames = 0
        self.records = 0
        self._policies: list[Policy] = []
        self._obd_answers = obd_answers
        # Called with (pgn, sa) of every J1939 message the general decoder completes (TP messages,
        # DM1): how the J1939 requester learns that a multi-packet answer arrived.
        self.on_message: Callable[[int, int], None] | None = None

    # -- plans ---------------------------------------------------------------------------------------

    def _policy_for(self, config: CanSignalConfig, layout: SignalLayout | None, unit: str | None) -> Policy:
        """One policy object per (config, signal layout): shared by every id that carries it."""
        for cfg, policy in self._by_name.setdefault(config.signal, []):
            if cfg is config:
                return policy
        if layout is not None:
            policy = POLICIES[config.policy](config, layout.unit, layout.scale, layout.offset, layout.digits)
        else:
            policy = POLICIES[config.policy](config, unit, None, 0.0, OBD_DIGITS)
        self._by_name[config.signal].append((config, policy))
        self._policies.append(policy)
        return policy

    def _plan(self, can_id: int, extended: bool):
        """What frames with this id are for: None (nothing), "special", or (layout, [(signal, policy)])."""
        if self._obd_answers and obd.is_response_id(can_id, extended):
            return "special"
        if extended:
            pgn = pgn_of(can_id)
            if pgn in _SPECIAL_PGNS:
                return "special"
            layout = self.db.by_pgn.get(pgn)
            sa = can_id & 0xFF
        else:
            layout = self.db.standard.get(can_id)
            sa = None
        if layout is None:
            return None
        entries = []
        for config in self._configs:
            sig = layout.by_name.get(config.signal)
            if sig is not None and (config.sa is None or config.sa == sa):
                entries.append((sig, self._policy_for(config, sig, sig.unit)))
        return (layout, entries) if entries else None

    # -- feeding -------------------------------------------------------------------------------------

    def feed(self, t: float, can_id: int, extended: bool, data: bytes) -> list[Record]:
        """One received frame (``t`` in epoch seconds); returns the records it completes."""
        self.frames += 1
        key = can_id | _EXTENDED if extended else can_id
        plan = self._plans.get(key, False)
        if plan is False:
            if len(self._plans) >= MAX_PLANS:
                self._plans.clear()
            plan = self._plans[key] = self._plan(can_id, extended)
        if plan is None:
            return []
        if plan == "special":
            items = self.decoder.feed(t, self.bus, can_id, extended, data)
            if items and self.on_message is not None and items[0].pgn is not None:
                self.on_message(items[0].pgn, items[0].sa)
            return self._decoded(items)
        layout, entries = plan
        out: list[Record] = []
        payload = None
        for sig, policy in entries:
            if not policy.always and not policy.wants(t):
                continue
            if payload is None:
                payload = self._payload(layout, data)
            value = sig.value(payload) if sig.shiftable else layout.decode(data, (sig,))[0][1]
            for when, v in policy.add(t, value):
                out.append(self._signal(when, policy, v))
        return out

    @staticmethod
    def _payload(layout: MessageLayout, data: bytes) -> int:
        if len(data) < layout.length:
            data = bytes(data).ljust(layout.length, b"\xff")
        return int.from_bytes(data, "little")

    def offer(self, items: Iterable[Decoded]) -> list[Record]:
        """Items decoded elsewhere (the OBD-II poller's answers) through the same policies."""
        return self._decoded(items)

    def _decoded(self, items: Iterable[Decoded]) -> list[Record]:
        out: list[Record] = []
        for item in items:
            if item.kind == "signal":
                for policy in self._policies_named(item):
                    for when, v in policy.add(item.time, item.value):
                        out.append(self._signal(when, policy, v))
            elif item.kind == "dtcs":
                out.extend(self._dtc_change(item))
            elif item.kind == "vin":
                out.extend(self._vin_change(item))
        return out

    def _policies_named(self, item: Decoded) -> list[Policy]:
        configs = [c for c in self._configs if c.signal == item.name and (c.sa is None or c.sa == item.sa)]
        if not configs:
            return []
        layout = None
        if item.pgn is not None and item.pgn in self.db.by_pgn:
            layout = self.db.by_pgn[item.pgn].by_name.get(item.name)
        return [self._policy_for(c, layout, item.unit) for c in configs]

    def _dtc_change(self, item: Decoded) -> list[Record]:
        dtcs: DtcSet = item.value
        key = (dtcs.protocol, dtcs.ecu)
        if self._dtcs.get(key) == dtcs:
            return []
        self._dtcs[key] = dtcs
        kind = "dm1" if dtcs.protocol == "j1939" else "obd_dtcs"
        return [self._record(item.time, Status(type=kind, attrs=dtcs.to_attrs()))]

    def _vin_change(self, item: Decoded) -> list[Record]:
        protocol = "obd2" if item.pid is not None else "j1939"
        ecu = item.sa if item.sa is not None else obd.ecu_of(item.id, item.extended)
        if self._vins.get((protocol, ecu)) == item.value:
            return []
        self._vins[(protocol, ecu)] = item.value
        attrs = {"vin": item.value, "bus": self.bus, "ecu": ecu, "protocol": protocol}
        return [self._record(item.time, Status(type="vin", attrs=attrs))]

    def tick(self, now: float) -> list[Record]:
        """Close windows that ended by ``now`` and time out stale TP / ISO-TP sessions; call about once a second."""
        self.decoder.expire(now)
        out: list[Record] = []
        for policy in self._policies:
            for when, v in policy.close(now):
                out.append(self._signal(when, policy, v))
        return out

    def dtc_sets(self) -> dict[tuple[str, int], DtcSet]:
        """The current trouble code set of every ECU seen, keyed by (protocol, ecu)."""
        return dict(self._dtcs)

    def _signal(self, t: float, policy: Policy, value: float | None) -> Record:
        return self._record(t, Signal(name=policy.name, value=value, unit=policy.unit, source=self.bus))

    def _record(self, t: float, payload) -> Record:
        self.records += 1
        return Record(utc=t, mono=self._mono(t), data=payload)
