"""The one record type that flows through the agent: sources -> processors -> buffer -> publisher.

A :class:`Record` wraps one typed payload (:class:`Fix`, :class:`Signal`, :class:`Event` or
:class:`Status`) with the two clocks every consumer needs: ``utc`` (seconds since the Unix epoch,
UTC; GPS time for fixes) for the backend, and ``mono`` (``time.monotonic()`` seconds on this boot)
for intervals on the device. ``seq`` is the per-device sequence number, assigned by the durable
buffer when it accepts the record and never repeated afterwards, across restarts and buffer resets.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any, Union

import msgspec

# Attribute values an event or status may carry: JSON scalars only, so every wire format can hold them.
Scalar = Union[str, int, float, bool, None]


class Fix(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="fix"):
    """One GPS fix per receiver epoch. Units are in the names; None where the receiver did not say."""

    lat: float
    lon: float
    alt_m: float | None = None
    speed_mps: float | None = None
    course_deg: float | None = None
    quality: int | None = None  # GGA fix quality (0 invalid, 1 GPS, 2 DGPS, 4 RTK fixed, ...)
    hdop: float | None = None
    sats_used: int | None = None
    mode: int | None = None  # 2 = 2D, 3 = 3D (GSA / gpsd convention); None when unknown
    geoid_sep_m: float | None = None  # geoid height above the WGS84 ellipsoid (GGA / GNS)
    pdop: float | None = None
    vdop: float | None = None
    sats_in_view: int | None = None  # satellites in view, all constellations (GSV)
    status: str | None = None  # RMC / GLL status: "A" valid, "V" receiver warning
    faa_mode: str | None = None  # NMEA 2.3+ mode indicator: A autonomous, D differential, E estimated, N not valid, ...
    lat_err_m: float | None = None  # 1-sigma latitude error (GST)
    lon_err_m: float | None = None  # 1-sigma longitude error (GST)
    alt_err_m: float | None = None  # 1-sigma altitude error (GST)


class Signal(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="signal"):
    """A sampled vehicle signal, e.g. engine speed; ``value`` is None when the ECU says not-available."""

    name: str
    value: float | None
    unit: str | None = None
    source: str | None = None  # bus name, e.g. "can0"


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="event"):
    """A derived driving or device event (``type`` e.g. "geofence_enter"), at the fix that caused it."""

    type: str
    lat: float | None = None
    lon: float | None = None
    attrs: dict[str, Scalar] = {}


class Status(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="status"):
    """A device status change (``type`` e.g. "agent_start", "records_dropped")."""

    type: str
    attrs: dict[str, Scalar] = {}


Payload = Union[Fix, Signal, Event, Status]

# Events and status changes go before positions and signals (lower number = sent first).
PRIORITY = {"event": 0, "status": 0, "fix": 1, "signal": 1}


class Record(msgspec.Struct, kw_only=True):
    """One item of telemetry. ``seq`` is None until the buffer accepts the record."""

    utc: float
    mono: float
    data: Payload
    seq: int | None = None

    @property
    def kind(self) -> str:
        """"fix", "signal", "event" or "status"."""
        return self.data.__struct_config__.tag  # type: ignore[return-value]

    @property
    def priority(self) -> int:
        """0 for events and status (sent first), 1 for fixes and signals."""
        return PRIORITY[self.kind]


def iso_utc(utc: float, digits: int = 3) -> str:
    """ISO 8601 UTC with ``digits`` (3 or 6) fractional digits and a ``Z``: 2017-01-10T00:09:41.000Z."""
    scale = 10**digits
    ticks = round(utc * scale)
    seconds, frac = divmod(ticks, scale)
    stamp = _dt.datetime.fromtimestamp(seconds, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{frac:0{digits}d}Z"


def parse_iso_utc(text: str) -> float:
    """Inverse of :func:`iso_utc`: seconds since the epoch."""
    parsed = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=_dt.timezone.utc)
    return parsed.timestamp()


def to_json_dict(record: Record, time_digits: int = 3) -> dict[str, Any]:
    """The flat JSON shape the CLI prints: ``kind``, ``time``, then the payload's fields."""
    out: dict[str, Any] = {"kind": record.kind, "time": iso_utc(record.utc, time_digits)}
    if record.seq is not None:
        out["seq"] = record.seq
    payload = msgspec.structs.asdict(record.data)
    attrs = payload.pop("attrs", None)
    out.update(payload)
    if attrs:
        out.update(attrs)
    return out
