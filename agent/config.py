"""The agent's YAML configuration: one schema, validated at load; unknown keys are errors.

``load_config(path)`` returns a :class:`Config` or raises :class:`ConfigError` whose message names
the file, the key path and what is wrong, e.g.
``/etc/telematics-agent/agent.yaml: mqtt.prot: unknown key (known keys: host, port, ...)``.

The schema is a tree of msgspec Structs (msgspec does the type checking, range constraints and
unknown-key rejection; this module only turns its errors into messages for installers).
Defaults are documented in ``firmware_config/agent.example.yaml``; a test keeps the two in step.
"""

from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import yaml

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
DeviceId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
TopicPrefix = Annotated[str, msgspec.Meta(pattern=r"^[^#+\s]+$")]


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every config section: unknown keys are rejected."""


class DeviceConfig(_Section):
    """Who this box is and where it keeps its state."""

    id: DeviceId
    data_dir: str = "/var/lib/telematics-agent"


class GpsFilterConfig(_Section):
    """Fix-quality thresholds of ``agent/processors/fix_filter.py`` (docs/gps.md)."""

    # A fix implying a speed above this from the last accepted fix is a jump (70 m/s = 252 km/h).
    max_speed_mps: PositiveFloat = 70.0
    # After this many jumps in a row that agree with each other, the receiver is believed again.
    jump_reanchor: PositiveInt = 3
    max_hdop: PositiveFloat = 10.0
    min_sats: Annotated[int, msgspec.Meta(ge=0)] = 4
    # Relative to a trusted wall clock (when the clock is trusted): fixes further ahead or older
    # than this are rejected.
    max_future_s: PositiveFloat = 5.0
    max_age_s: PositiveFloat = 300.0


class GpsConfig(_Section):
    """The GPS receiver: a serial port (pyserial) or gpsd's JSON on TCP."""

    enabled: bool = True
    source: Literal["serial", "gpsd"] = "serial"
    port: str = "/dev/gps0"
    baud: PositiveInt = 9600
    # Try the common rates in turn while the receiver sends no valid sentence (baud is tried first).
    baud_detect: bool = False
    # Accept sentences without a checksum (for receivers that never send one).
    allow_missing_checksum: bool = False
    # An epoch is emitted when the next one starts, or after this long with no new sentence.
    epoch_timeout_s: PositiveFloat = 0.25
    # How long to wait before reopening a port that failed or disappeared.
    reopen_interval_s: PositiveFloat = 2.0
    # No byte (serial) or report (gpsd) for this long: a gps_silent event.
    silent_timeout_s: PositiveFloat = 5.0
    # Receiver dates before this are a GPS week-number rollover (1024 weeks) and are moved forward.
    rollover_floor: _dt.date = _dt.date(2025, 1, 1)
    # The host clock more than this off GPS time is reported (a status record), and set when set_clock.
    clock_margin_s: PositiveFloat = 2.0
    set_clock: bool = False
    # source: gpsd
    gpsd_host: str = "127.0.0.1"
    gpsd_port: Port = 2947
    filter: GpsFilterConfig = msgspec.field(default_factory=GpsFilterConfig)


class TlsConfig(_Section):
    """TLS for the broker link: server verification by ``ca_file``; client certificate optional."""

    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None


class MqttConfig(_Section):
    """The MQTT link (paho-mqtt 2.x) and the batching of telemetry."""

    host: str = "127.0.0.1"
    port: Port = 1883
    topic_prefix: TopicPrefix = "telematics"
    client_id: str | None = None  # default: the device id
    keepalive_s: Annotated[int, msgspec.Meta(ge=5, le=3600)] = 60
    username: str | None = None
    password: str | None = None
    tls: TlsConfig | None = None
    batch_max_records: Annotated[int, msgspec.Meta(ge=1, le=10000)] = 60
    # A batch is sent when it is full or when its oldest record has waited this long.
    batch_max_wait_s: PositiveFloat = 1.0
    # Batches published but not yet PUBACKed by the broker.
    max_inflight: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 20
    # A batch the collector has not confirmed within this time is sent again.
    ack_timeout_s: PositiveFloat = 30.0
    # Reconnect backoff: capped exponential with jitter.
    reconnect_min_s: PositiveFloat = 1.0
    reconnect_max_s: PositiveFloat = 60.0
    # "auto": MQTT 5, falling back to 3.1.1 for a broker that refuses version 5.
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    # Who confirms a batch: the collector on the ack topic, or (a persistent broker cluster as the
    # system of record) the broker's PUBACK. docs/transport.md explains the difference.
    ack: Literal["collector", "broker"] = "collector"
    # Batches sent and not yet confirmed; bounds memory and what a dead collector costs on air.
    # (At 60 records a batch, 50 batches are about a third of a second of a collector's work: live
    # records never queue behind more backlog than that.)
    max_unacked_batches: Annotated[int, msgspec.Meta(ge=1, le=100000)] = 50
    # Backlog (records stored before the link came up) is drained behind live data at this rate; 0: no cap.
    backlog_max_records_per_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    # Wire format of telemetry batches (docs/wire-format.md): 1 zlib JSON, 2 compact columnar.
    wire_version: Literal[1, 2] = 2


class BufferConfig(_Section):
    """The durable store-and-forward buffer (SQLite, WAL)."""

    # Every accepted record is on disk (fsynced) within this window.
    commit_window_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 1.0
    max_bytes: Annotated[int, msgspec.Meta(ge=1_000_000)] = 256 * 1024 * 1024


class LoggingConfig(_Section):
    """Log level of the agent (journald reads stderr)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


# BCM GPIO numbers of the 40-pin header (gpiozero's default numbering); None = not wired.
BcmPin = Annotated[int, msgspec.Meta(ge=0, le=27)]


class GpioConfig(_Section):
    """Ignition sense input and status LEDs (gpiozero); pins None when not fitted."""

    ignition_pin: BcmPin | None = None  # None: no ignition line, the agent assumes ignition on
    # True: the line pulls the pin low when the ignition is on (internal pull-up); False: high (pull-down).
    ignition_pull_up: bool = False
    # The line must hold a new level this long before it counts (cranking dips, loose contacts).
    ignition_debounce_s: Annotated[float, msgspec.Meta(ge=0, le=30)] = 1.0
    led_gps_pin: BcmPin | None = None  # on: fix; blinking: no fix
    led_link_pin: BcmPin | None = None  # on: broker connected; blinking: not connected
    led_backlog_pin: BcmPin | None = None  # on: more than backlog_led_records waiting on disk
    backlog_led_records: PositiveInt = 1000


class PowerConfig(_Section):
    """What happens after the ignition goes off."""

    # Keep reporting this long after ignition off (a short stop does not end the trip).
    run_on_s: Annotated[float, msgspec.Meta(ge=0)] = 120.0
    # Longest wait for the buffer to be flushed to the broker before powering down.
    flush_timeout_s: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    # Output that keeps the supply on (a power-hold relay / HAT line) until shutdown; None: not fitted.
    hold_pin: BcmPin | None = None
    # Shut the box down (through logind) after the run-on; false: keep running, only report.
    shutdown: bool = False
    shutdown_command: list[str] = msgspec.field(default_factory=lambda: ["systemctl", "poweroff"])


class StatusConfig(_Section):
    """The status file ``telematics-agent status`` reads ({data_dir}/status.json)."""

    interval_s: Annotated[float, msgspec.Meta(ge=0.5, le=300)] = 5.0


class RemoteConfig(_Section):
    """Remote management over MQTT: {topic_prefix}/{device}/config, /command, /response."""

    enabled: bool = True
    # A change after which the broker is not reachable within this time is rolled back.
    rollback_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 60.0


NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]


class UpdateConfig(_Section):
    """Over-the-air updates (docs/ota.md): signed releases, A/B install, health check, rollback."""

    enabled: bool = True
    # The fleet's Ed25519 release key (PEM), installed at provisioning; without it every update is refused.
    public_key: str = "/etc/telematics-agent/release.pub"
    # Versions below this are refused; None: the running version is the floor (no downgrades).
    min_version: str | None = None
    # Download speed cap in bytes/s, like the backlog's (cellular plans cost money); 0: no cap.
    max_bytes_per_s: NonNegFloat = 0.0
    ca_file: str | None = None  # CA bundle for HTTPS downloads; None: the system's
    # Chunks over MQTT: ask again for the missing ones after this long without a chunk.
    chunk_idle_s: PositiveFloat = 30.0
    install_root: str = "/opt/telematics-agent"  # versions/<v>/ (one venv each) and the current link
    python: str = "/usr/bin/python3"  # the interpreter of the new versions' virtual environments
    service: str = "telematics-agent.service"
    # The new version must prove itself healthy within this time, else the previous one comes back.
    health_timeout_s: PositiveFloat = 300.0
    # This many restarts of the new version within the health window is a crash loop: roll back at once.
    max_restarts: PositiveInt = 2
    keep_versions: Annotated[int, msgspec.Meta(ge=2)] = 2  # installed versions kept (current and previous)
    # The root-only install step runs as the unit {apply_unit}@{version}.service (systemd/, allowed
    # to the agent's user by a polkit rule); None: a child process of the agent (tests, no systemd).
    apply_unit: str | None = "telematics-update"


class CertificatesConfig(_Section):
    """Client certificate renewal over MQTT (docs/certificates.md)."""

    enabled: bool = True
    renew_before_days: PositiveFloat = 30.0  # renew when the certificate expires within this many days
    check_interval_s: PositiveFloat = 3600.0  # how often the expiry is looked at
    # No signed certificate within this time: give up this attempt (reported), retry at the next check.
    response_timeout_s: PositiveFloat = 120.0


class GeofencesConfig(_Section):
    """Geofences (GeoJSON) and their hysteresis; per-fence properties override the defaults."""

    file: str | None = None  # GeoJSON FeatureCollection; None: no fences until one is received
    # A fence is entered (left) only this far inside (outside) its boundary: GPS wanders by metres.
    hysteresis_m: NonNegFloat = 10.0
    # ... and only after staying beyond that margin this long.
    hysteresis_s: NonNegFloat = 3.0
    dwell_s: PositiveFloat = 600.0  # geofence_dwell after this long inside
    approach_m: NonNegFloat = 1000.0  # stop_approach radius around customer stops; 0: none
    # The speed for an approach ETA is the mean over this window (long enough to smooth a junction,
    # short enough to forget the last stop).
    eta_window_s: PositiveFloat = 20.0


class StopsConfig(_Section):
    """Delivery stops: stationary within a radius for at least a duration."""

    radius_m: PositiveFloat = 30.0
    min_duration_s: PositiveFloat = 120.0


class TripsConfig(_Section):
    """Trips from the ignition line, else CAN engine speed, else movement."""

    engine_on_rpm: PositiveFloat = 300.0  # engine running above this (cranking is ~150-250 rpm)
    moving_speed_mps: PositiveFloat = 2.0  # movement-based trips: start above this speed
    # Movement-based trips end after standing still this long.
    movement_end_s: PositiveFloat = 300.0


class IdlingConfig(_Section):
    """Engine running while standing still."""

    min_duration_s: PositiveFloat = 300.0
    still_speed_mps: PositiveFloat = 1.0  # standing still below this speed


class DrivingConfig(_Section):
    """Harsh driving and overspeed. Thresholds None take the vehicle profile's defaults."""

    vehicle: Literal["van", "truck"] = "truck"
    harsh_accel_mps2: PositiveFloat | None = None
    harsh_brake_mps2: PositiveFloat | None = None
    harsh_corner_mps2: PositiveFloat | None = None
    min_speed_kmh: NonNegFloat = 15.0  # below this, harsh driving is not checked
    overspeed_kmh: PositiveFloat | None = None  # global limit; None: only speed-zone fences
    overspeed_min_s: NonNegFloat = 10.0  # shorter episodes are not reported
    # An episode ends after the speed has stayed at or below the limit this long.
    overspeed_end_s: NonNegFloat = 5.0


class ReportingProfile(_Section):
    """When a position is reported; a criterion of 0 is off."""

    period_s: PositiveFloat  # at least one report this often
    distance_m: NonNegFloat = 0.0
    heading_deg: NonNegFloat = 0.0
    speed_change_mps: NonNegFloat = 0.0
    # Report before the track between reports would stray further than this from a straight line
    # travelled at constant speed (the backend's interpolation); 0: off.
    tolerance_m: NonNegFloat = 0.0


class ReportingConfig(_Section):
    """Adaptive position reporting: a moving and a parked profile."""

    enabled: bool = True
    moving_speed_mps: PositiveFloat = 1.5  # moving profile above this speed
    moving: ReportingProfile = msgspec.field(
        default_factory=lambda: ReportingProfile(period_s=60.0, heading_deg=30.0, speed_change_mps=5.0, tolerance_m=7.0)
    )
    parked: ReportingProfile = msgspec.field(
        default_factory=lambda: ReportingProfile(period_s=600.0, distance_m=50.0, tolerance_m=7.0)
    )


class DiagnosticsConfig(_Section):
    """Trouble codes appearing and clearing, low fuel, maintenance due."""

    low_fuel_pct: Annotated[float, msgspec.Meta(ge=0, le=100)] = 15.0  # low_fuel below this level
    # ... and again only after the level rose this much above it (sloshing, refuelling).
    low_fuel_clear_pct: Annotated[float, msgspec.Meta(ge=0, le=100)] = 5.0
    # maintenance_due once the engine hours / odometer reach these (set again after a service); None: off.
    service_due_engine_h: NonNegFloat | None = None
    service_due_km: NonNegFloat | None = None


class EdgeConfig(_Section):
    """Edge logic on the truck: geofences, stops, trips, idling, driving events, adaptive reporting."""

    geofences: GeofencesConfig = msgspec.field(default_factory=GeofencesConfig)
    stops: StopsConfig = msgspec.field(default_factory=StopsConfig)
    trips: TripsConfig = msgspec.field(default_factory=TripsConfig)
    idling: IdlingConfig = msgspec.field(default_factory=IdlingConfig)
    driving: DrivingConfig = msgspec.field(default_factory=DrivingConfig)
    reporting: ReportingConfig = msgspec.field(default_factory=ReportingConfig)
    diagnostics: DiagnosticsConfig = msgspec.field(default_factory=DiagnosticsConfig)


class CanSignalConfig(_Section):
    """A sampling policy for one decoded CAN signal (a DBC signal name or an OBD-II quantity name)."""

    signal: str
    name: str | None = None  # the record's name; default the signal's
    # latest: the newest value once per period; min/max/mean: over each period; change: beyond deadband
    policy: Literal["latest", "min", "max", "mean", "change"] = "latest"
    period_s: PositiveFloat = 1.0
    deadband: NonNegFloat = 0.0  # change policy: emitted when it moves more than this
    sa: Annotated[int, msgspec.Meta(ge=0, le=253)] | None = None  # J1939: only this source address


class CanBusConfig(_Section):
    """One CAN bus opened through python-can."""

    name: str = "can0"  # the records' source
    # python-can interface: socketcan, slcan_buffered (the project's), slcan, virtual, ...
    interface: str = "socketcan"
    channel: str = "can0"  # can0, /dev/ttyACM0, a virtual channel name
    # bit/s; 0: detect (only on a listen-only bus); socketcan's is set by systemd-networkd
    bitrate: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 250000
    protocol: Literal["j1939", "obd2"] = "j1939"  # obd2: poll the vehicle (needs can.allow_transmit)
    reopen_interval_s: PositiveFloat = 2.0  # wait before reopening a bus that failed or vanished
    options: dict[str, str | int | float | bool] = {}  # extra keyword arguments for python-can


class ObdPollConfig(_Section):
    """OBD-II polling (ISO 15765-4) on obd2 buses."""

    # Service 01 PIDs to poll (numbers); empty: every supported PID the agent decodes
    pids: list[Annotated[int, msgspec.Meta(ge=1, le=255)]] = []
    period_s: PositiveFloat = 1.0  # each PID this often
    timeout_s: PositiveFloat = 0.1  # an unanswered request after this long counts a miss
    max_misses: PositiveInt = 3  # a PID unanswered this many times in a row is dropped
    extended_ids: bool = False  # 29-bit ids (18DB33F1 / 18DAxxF1) instead of 11-bit (7DF / 7E8)
    dtc_period_s: PositiveFloat = 60.0  # stored codes (service 03) this often


class J1939RequestConfig(_Section):
    """One on-request parameter group the agent asks for (J1939 Request, PGN 59904)."""

    pgn: Annotated[int, msgspec.Meta(ge=0, le=0x3FFFF)]
    refresh_s: NonNegFloat = 0.0  # ask again this long after an answer; 0: once is enough


class J1939Config(_Section):
    """J1939 requests on j1939 buses; sent only when can.allow_transmit (docs/can.md)."""

    # The agent's own address (no address claiming): 251 (0xFB) is J1939's on-board data logger.
    source_address: Annotated[int, msgspec.Meta(ge=0, le=255)] = 0xFB
    destination: Annotated[int, msgspec.Meta(ge=0, le=255)] = 0xFF  # 255: global, every ECU
    # J1939-71: the VIN once; engine hours and total distance each minute, when not broadcast anyway.
    requests: list[J1939RequestConfig] = msgspec.field(default_factory=lambda: [
        J1939RequestConfig(pgn=65260), J1939RequestConfig(pgn=65253, refresh_s=60.0),
        J1939RequestConfig(pgn=65248, refresh_s=60.0)])
    # Unanswered: asked again after retry_s, doubling up to retry_max_s (J1939-21 T3 is 1.25 s).
    retry_s: Annotated[float, msgspec.Meta(ge=1.25)] = 5.0
    retry_max_s: PositiveFloat = 300.0

    def __post_init__(self) -> None:
        if self.source_address >= 0xFE:
            raise ValueError(
                f"source_address {self.source_address} is the {'null' if self.source_address == 0xFE else 'global'} "
                "address, which may not send requests (J1939-81): set the address this vehicle leaves free for the agent")
        if self.destination == self.source_address:
            raise ValueError(f"destination {self.destination} is the agent's own source_address")
        if self.retry_max_s < self.retry_s:
            raise ValueError(f"retry_max_s {self.retry_max_s} is below retry_s {self.retry_s}")
        pgns = [r.pgn for r in self.requests]
        twice = sorted({p for p in pgns if pgns.count(p) > 1})
        if twice:
            raise ValueError(f"requests: PGN {', '.join(map(str, twice))} listed more than once")


def _default_can_signals() -> list[CanSignalConfig]:
    latest_1s = ("EngineSpeed", "WheelBasedVehicleSpeed", "AccelPedalPos1", "EngineRPM", "VehicleSpeed")
    every_min = ("EngineTotalHoursOfOperation", "EngineTotalFuelUsed", "TotalVehicleDistanceHighRes",
                 "TotalVehicleDistance", "FuelLevel1", "FuelTankLevel", "Odometer")
    return [
        *(CanSignalConfig(signal=s) for s in latest_1s),
        CanSignalConfig(signal="EngineFuelRate", policy="mean", period_s=10.0),
        *(CanSignalConfig(signal=s, period_s=60.0) for s in every_min),
        *(CanSignalConfig(signal=s, policy="change", deadband=1.0)
          for s in ("EngineCoolantTemperature", "EngineOilTemperature1", "AmbientAirTemperature", "EngineCoolantTemp")),
        *(CanSignalConfig(signal=s, policy="change")
          for s in ("BrakeSwitch", "CruiseControlActive", "ParkingBrakeSwitch", "TransCurrentGear")),
    ]


class CanConfig(_Section):
    """Vehicle CAN buses: J1939 (trucks) and OBD-II (vans). Listen-only unless allow_transmit."""

    # This vehicle allows the agent to transmit (OBD-II polling, J1939 requests); off: the
    # controller is opened listen-only and the agent puts nothing on the bus, not even ACKs.
    allow_transmit: bool = False
    buses: list[CanBusConfig] = msgspec.field(default_factory=lambda: [CanBusConfig()])
    dbc: list[str] = []  # extra DBC files, on top of the project's own J1939 DBC
    signals: list[CanSignalConfig] = msgspec.field(default_factory=_default_can_signals)
    obd: ObdPollConfig = msgspec.field(default_factory=ObdPollConfig)
    j1939: J1939Config = msgspec.field(default_factory=J1939Config)

    def __post_init__(self) -> None:
        # Detecting the bit rate means trying wrong ones on the vehicle's bus: only harmless when
        # the controller cannot transmit (a wrong-rate node that acknowledges destroys frames).
        if self.allow_transmit and any(bus.bitrate == 0 for bus in self.buses):
            raise ValueError("bitrate 0 (detect) needs a listen-only bus: set the bitrate or allow_transmit: false")


class RecordConfig(_Section):
    """Recording of the raw NMEA and CAN the agent receives (agent/ops/recorder.py, docs/recording.md)."""

    enabled: bool = False
    dir: str = "/var/lib/telematics-agent/recordings"
    nmea: bool = True  # nmea-<UTC>.nmea: the bytes exactly as read from the GPS port
    can: bool = True  # can-<UTC>.log: candump -L lines of every frame received
    # A file is closed and a new one begun past this size; the oldest are deleted past the total.
    max_file_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 16 * 1024 * 1024
    max_total_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 256 * 1024 * 1024


class Config(_Section):
    """The whole agent configuration."""

    device: DeviceConfig
    gps: GpsConfig = msgspec.field(default_factory=GpsConfig)
    mqtt: MqttConfig = msgspec.field(default_factory=MqttConfig)
    buffer: BufferConfig = msgspec.field(default_factory=BufferConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
    gpio: GpioConfig = msgspec.field(default_factory=GpioConfig)
    power: PowerConfig = msgspec.field(default_factory=PowerConfig)
    status: StatusConfig = msgspec.field(default_factory=StatusConfig)
    remote: RemoteConfig = msgspec.field(default_factory=RemoteConfig)
    update: UpdateConfig = msgspec.field(default_factory=UpdateConfig)
    certificates: CertificatesConfig = msgspec.field(default_factory=CertificatesConfig)
    edge: EdgeConfig = msgspec.field(default_factory=EdgeConfig)
    can: CanConfig | None = None  # None: no CAN source
    record: RecordConfig = msgspec.field(default_factory=RecordConfig)


class ConfigError(Exception):
    """The configuration file cannot be used; the message names file, key path and problem."""


def load_config(path: str | Path) -> Config:
    """Read and validate the YAML file at ``path``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return parse_config(text, source=str(path))


def parse_config(text: str, source: str = "<config>") -> Config:
    """Validate YAML ``text``; ``source`` names it in error messages."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        return msgspec.convert(raw, Config, strict=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_explain(str(exc), raw)}") from exc


_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<key>[^`]+)`")
_MISSING = re.compile(r"Object missing required field `(?P<key>[^`]+)`")


def _explain(message: str, raw: dict) -> str:
    """Turn msgspec's "Expected `int`, got `str` - at `$.mqtt.port`" into "mqtt.port: expected int, got str"."""
    match = _AT.match(message)
    msg, path = match.group("msg"), (match.group("path") or "")
    path = path.lstrip(".").replace("[", ".").replace("]", "")
    unknown = _UNKNOWN.match(msg)
    if unknown:
        key = unknown.group("key")
        full = f"{path}.{key}" if path else key
        known = ", ".join(sorted(_section_fields(path)))
        return f"{full}: unknown key (a typo? known keys here: {known})"
    missing = _MISSING.match(msg)
    if missing:
        key = missing.group("key")
        full = f"{path}.{key}" if path else key
        return f"{full}: required key is missing"
    text = msg.replace("`", "")
    text = text[0].lower() + text[1:] if text else text
    return f"{path or '(top level)'}: {text}"


def _section_fields(path: str) -> list[str]:
    """The keys a section accepts, for 'known keys' hints."""
    struct: type = Config
    for part in filter(None, path.split(".")):
        if part.isdigit():
            continue  # a list index: the element type is what _struct_types found
        hints = msgspec.structs.fields(struct)
        field = next((f for f in hints if f.name == part), None)
        if field is None:
            return []
        candidates = [t for t in _struct_types(field.type)]
        if not candidates:
            return []
        struct = candidates[0]
    return [f.name for f in msgspec.structs.fields(struct)]


def _struct_types(tp: object) -> list[type]:
    """Struct classes inside a (possibly Optional / Annotated) type."""
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return [tp]
    out: list[type] = []
    for arg in getattr(tp, "__args__", ()) or ():
        out.extend(_struct_types(arg))
    return out


def to_yaml(config: Config) -> str:
    """The config with every default filled in, as YAML (for ``check-config --print``)."""
    return yaml.safe_dump(msgspec.to_builtins(config), sort_keys=False)
