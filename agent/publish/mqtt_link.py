"""The MQTT link: batches from the durable buffer to the broker, acknowledgements back.

One thread (``run``) owns the session: it connects (with capped, jittered exponential backoff by
tenacity), runs paho's network loop, publishes batches while the in-flight window has room, and
handles the collector's acks. Each connection is a fresh paho client, so nothing of a dead session
lingers in memory; after every reconnect the buffer re-sends everything unconfirmed.

Topics (docs/topics.md), with ``P = {topic_prefix}/{device_id}``:
``P/telemetry`` (batches, QoS 1), ``P/ack`` (the collector's confirmations, subscribed),
``P/status`` (retained: the birth message on connect, the last will when the link dies).
Other modules publish and subscribe through :meth:`MqttLink.publish_message` / :meth:`MqttLink.subscribe`.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import stat
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

import msgspec
import paho.mqtt.client as mqtt
import tenacity
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import __version__
from agent.clock import Clock
from agent.config import MqttConfig, TlsConfig
from agent.record import Record
from agent.wire import encode_batch

log = logging.getLogger(__name__)

# Longest wait for the broker's CONNACK after the TCP (and TLS) connection is up (or keepalive_s if shorter).
CONNACK_TIMEOUT_S = 10.0
# paho's network loop blocks at most this long, so new batches go out within it.
LOOP_TIMEOUT_S = 0.05
# The buffer's lane of records appended since the link came up (agent.buffer's DurableBuffer.LANES).
LIVE_LANE = "live"
# MQTT 5 reason code 0x84 "Unsupported Protocol Version" (MQTT 5.0 section 3.2.2.2).
UNSUPPORTED_PROTOCOL = 0x84
# MQTT 5 reason code 0x8D "Keep Alive timeout" (section 3.14.2.1); paho reports its own timeout with it.
KEEPALIVE_TIMEOUT = 0x8D
# Messages other modules queue while the window is full; beyond this, publish_message fails.
MAX_QUEUED_MESSAGES = 1000
# The topic alias the telemetry topic gets on each MQTT 5 connection whose broker allows aliases.
TELEMETRY_ALIAS = 1


class LinkDown(Exception):
    """The session could not be set up or was lost; the message says why, for one log line."""


@dataclass
class _Sent:
    ranges: list[tuple[int, int]]
    records: int


def seq_ranges(seqs: Sequence[int]) -> list[tuple[int, int]]:
    """Inclusive ``(first, last)`` runs of consecutive sequence numbers, e.g. [1,2,3,7] -> [(1,3),(7,7)]."""
    out: list[tuple[int, int]] = []
    for seq in sorted(seqs):
        if out and seq == out[-1][1] + 1:
            out[-1] = (out[-1][0], seq)
        else:
            out.append((seq, seq))
    return out


def parse_ack(payload: bytes) -> list[tuple[int, int]]:
    """The collector's ack, ``{"ranges": [[first, last], ...]}``; raises ValueError when malformed."""
    doc = json.loads(payload)
    ranges = doc["ranges"] if isinstance(doc, dict) else None
    if not isinstance(ranges, list):
        raise ValueError("no 'ranges' list")
    out = []
    for item in ranges:
        if not (isinstance(item, list) and len(item) == 2 and all(isinstance(v, int) and v >= 0 for v in item)):
            raise ValueError(f"bad range {item!r}")
        out.append((item[0], item[1]))
    return out


def check_key_file(path: str) -> None:
    """Refuse a private key that others can read (ssh does the same); raises LinkDown with the fix."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise LinkDown(f"cannot read the TLS key file {path}: {exc.strerror or exc}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise LinkDown(
            f"refusing the TLS key file {path}: readable by group or others (mode {stat.S_IMODE(mode):o}); "
            f"run: chmod 600 {path}"
        )


class _TokenBucket:
    """Records/s cap for the backlog; ``rate`` 0 means no cap."""

    def __init__(self, rate: float, burst: float, clock: Clock) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._tokens, self._at = burst, clock.monotonic()

    def allowance(self) -> int | None:
        if self.rate <= 0:
            return None
        now = self._clock.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        return int(self._tokens)

    def spend(self, n: int) -> None:
        if self.rate > 0:
            self._tokens -= n


class MqttLink:
    """Publishes the buffer's batches on ``{prefix}/{device}/telemetry`` and frees them on acks."""

    def __init__(
        self,
        config: MqttConfig,
        device_id: str,
        buffer,
        clock: Clock,
        *,
        config_hash: str | None = None,
        clock_plausible: Callable[[], bool] | None = None,
    ) -> None:
        self._config = config
        # A Pi without a real-time clock may boot in 1970: TLS waits until the clock is plausible,
        # or every certificate would be "not yet valid" (docs/transport.md).
        self._clock_plausible = clock_plausible or (lambda: True)
        self._device_id = device_id
        self._buffer = buffer
        self._clock = clock
        self._config_hash = config_hash
        self._base = f"{config.topic_prefix}/{device_id}"
        self._client: mqtt.Client | None = None
        self._client_lock = threading.Lock()
        self._subs: dict[str, Callable[[bytes], None]] = {}
        self._window: dict[int, _Sent] = {}
        self._status_extra: dict = {}
        self._bucket = _TokenBucket(
            config.backlog_max_records_per_s, max(config.batch_max_records, config.backlog_max_records_per_s), clock
        )
        self._use_v5 = config.protocol != "3.1.1"
        self._connected = threading.Event()
        self._session_error: str | None = None
        self._telemetry_alias: bool | None = None
        self._connack_refused: str | None = None
        self._paho_error: str | None = None
        # Messages logged since the link was last up: a flapping cause is logged once, not per retry.
        self._said: set[str] = set()
        self._live_take_at = 0.0
        self._stats = {
            "connected": False,
            "protocol": None,
            "state": "starting",
            "last_error": None,
            "connects": 0,
            "published_batches": 0,
            "published_records": 0,
            "acked_batches": 0,
            "last_publish_utc": None,
            "last_ack_utc": None,
        }

    # -- public API ---------------------------------------------------------------------------

    def topic(self, suffix: str) -> str:
        """``{topic_prefix}/{device_id}/{suffix}``."""
        return f"{self._base}/{suffix}"

    def run(self, stop: threading.Event) -> None:
        """Keep a session up and publish until ``stop`` is set; never raises for a broker problem."""
        while not stop.is_set():
            client = self._connect_with_backoff(stop)
            if client is None:
                break
            try:
                self._serve(client, stop)
            except LinkDown as exc:
                self._state("down", f"connection to {self._where()} lost: {exc}; buffering meanwhile", logging.WARNING)
            finally:
                self._drop_client(client)

    def publish_message(self, topic_suffix: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        """Publish ``payload`` on ``{prefix}/{device}/{topic_suffix}``; False when the link is down."""
        with self._client_lock:
            client = self._client
            if client is None or not self._connected.is_set():
                return False
            info = client.publish(self.topic(topic_suffix), payload, qos=qos, retain=retain)
        return info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    def subscribe(self, topic_suffix: str, callback: Callable[[bytes], None]) -> None:
        """Call ``callback(payload)`` (in the link's thread) for messages on ``{prefix}/{device}/{topic_suffix}``."""
        topic = self.topic(topic_suffix)
        with self._client_lock:  # _serve() snapshots the topics under this lock: one SUBSCRIBE each
            self._subs[topic] = callback
            if self._client is not None and self._connected.is_set():
                self._client.subscribe(topic, qos=1)

    def update_status(self, **fields) -> None:
        """Add ``fields`` to the retained status message and publish it again when connected."""
        self._status_extra.update(fields)
        if self._connected.is_set():
            self.publish_message("status", self._status_payload("online"), qos=1, retain=True)

    def use_tls(self, tls: TlsConfig) -> None:
        """Connect with ``tls`` from now on (a renewed client certificate): the session is closed and
        opened again at once; the buffer re-sends whatever was unconfirmed, as after any reconnect."""
        self._config = msgspec.structs.replace(self._config, tls=tls)
        self._session_error = "reconnecting with a renewed client certificate"

    @property
    def tls(self) -> TlsConfig | None:
        """The TLS settings of the next connection."""
        return self._config.tls

    def stats(self) -> dict:
        """Link figures for the status report."""
        out = dict(self._stats)
        out["batches_inflight"] = len(self._window)
        out["unacked_batches"] = self._buffer.inflight_batches()
        return out

    # -- connecting ---------------------------------------------------------------------------

    def _where(self) -> str:
        return f"{self._config.host}:{self._config.port}"

    def _connect_with_backoff(self, stop: threading.Event) -> mqtt.Client | None:
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(LinkDown),
            wait=tenacity.wait_exponential_jitter(
                multiplier=self._config.reconnect_min_s, max=self._config.reconnect_max_s, jitter=self._config.reconnect_min_s
            ),
            stop=tenacity.stop_when_event_set(stop),
            sleep=stop.wait,
            before_sleep=self._before_retry,
            retry_error_callback=lambda _state: None,
        )
        return retrying(self._connect_once)

    def _before_retry(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        self._state("down", f"broker {self._where()} unavailable: {exc}; buffering, retrying with backoff", logging.WARNING)

    def _connect_once(self) -> mqtt.Client:
        cfg = self._config
        if cfg.tls is not None and not self._clock_plausible():
            # No timestamp in the text: the same cause is logged once, not once per retry.
            raise LinkDown("the system clock is not plausible yet (a Pi without RTC boots in the past): "
                           "holding the TLS connection until GPS time or NTP sets it")
        protocol = MQTTProtocolVersion.MQTTv5 if self._use_v5 else MQTTProtocolVersion.MQTTv311
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id or self._device_id,
            protocol=protocol,
            reconnect_on_failure=False,
            **({} if self._use_v5 else {"clean_session": True}),
        )
        client.max_inflight_messages_set(cfg.max_inflight + 10)
        client.max_queued_messages_set(MAX_QUEUED_MESSAGES)
        client.connect_timeout = CONNACK_TIMEOUT_S
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_log = self._on_log
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        if cfg.tls is not None:
            self._set_tls(client)
        will = self._status_payload("offline", reason="connection_lost")
        client.will_set(self.topic("status"), will, qos=1, retain=True)
        self._connected.clear()
        self._connack_refused = self._paho_error = None
        try:
            client.connect(cfg.host, cfg.port, keepalive=cfg.keepalive_s, **self._connect_kwargs())
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise LinkDown(_describe_socket_error(exc)) from exc
        connack_timeout = min(CONNACK_TIMEOUT_S, float(cfg.keepalive_s))
        deadline = self._clock.monotonic() + connack_timeout
        while not self._connected.is_set():
            rc = client.loop(timeout=0.1)
            if self._connack_refused:
                client.disconnect()
                raise LinkDown(f"the broker refused the connection: {self._connack_refused}")
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                detail = self._paho_error or mqtt.error_string(rc)
                if cfg.tls is not None and "EOF occurred in violation of protocol" in detail:
                    detail += " (the broker closed the TLS session: does it accept this client certificate?)"
                if self._use_v5 and self._config.protocol == "auto" and not self._paho_error:
                    # A 3.1.1-only broker closes the connection on a version 5 CONNECT.
                    self._use_v5 = False
                    detail += " (trying MQTT 3.1.1 next)"
                raise LinkDown(detail)
            if self._clock.monotonic() > deadline:
                raise LinkDown(f"no answer to CONNECT within {connack_timeout:g} s")
        return client

    def _connect_kwargs(self) -> dict:
        if not self._use_v5:
            return {}
        props = Properties(PacketTypes.CONNECT)
        # Session state is not kept: every reconnect re-sends what is unconfirmed from the disk.
        props.SessionExpiryInterval = 0
        return {"clean_start": True, "properties": props}

    def _set_tls(self, client: mqtt.Client) -> None:
        tls = self._config.tls
        if tls.key_file:
            check_key_file(tls.key_file)
        try:
            client.tls_set(
                ca_certs=tls.ca_file,
                certfile=tls.cert_file,
                keyfile=tls.key_file,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise LinkDown(f"TLS set-up failed (ca_file {tls.ca_file}, cert_file {tls.cert_file}): {exc}") from exc

    # -- a session ----------------------------------------------------------------------------

    def _serve(self, client: mqtt.Client, stop: threading.Event) -> None:
        with self._client_lock:
            self._client = client
            topics = list(self._subs)  # later ones subscribe() sends itself
        self._window.clear()
        self._session_error = None
        self._buffer.requeue_all()
        self._stats.update(connected=True, protocol="5" if self._use_v5 else "3.1.1", connects=self._stats["connects"] + 1)
        client.subscribe(self.topic("ack"), qos=1)
        for topic in topics:
            client.subscribe(topic, qos=1)
        client.publish(self.topic("status"), self._status_payload("online"), qos=1, retain=True)
        self._state(
            "up", f"connected to {self._where()} (MQTT {self._stats['protocol']}{', TLS' if self._config.tls else ''})", logging.INFO
        )
        while not stop.is_set():
            rc = client.loop(timeout=LOOP_TIMEOUT_S)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or self._session_error:
                raise LinkDown(self._session_error or self._paho_error or mqtt.error_string(rc))
            self._pump(client)
        self._goodbye(client)

    def _goodbye(self, client: mqtt.Client) -> None:
        """Clean stop: say offline (a clean disconnect does not fire the will) and let PUBACKs arrive."""
        client.publish(self.topic("status"), self._status_payload("offline", reason="shutdown"), qos=1, retain=True)
        deadline = self._clock.monotonic() + 2.0
        while client.want_write() and self._clock.monotonic() < deadline:
            client.loop(timeout=0.05)
        client.disconnect()
        client.loop(timeout=0.1)
        self._state("stopped", f"disconnected from {self._where()}", logging.INFO)

    def _drop_client(self, client: mqtt.Client) -> None:
        with self._client_lock:
            if self._client is client:
                self._client = None
        self._connected.clear()
        self._window.clear()
        self._stats["connected"] = False
        try:
            client.disconnect()
        except Exception:  # the socket may already be gone; nothing to free beyond it
            pass

    def _pump(self, client: mqtt.Client) -> None:
        """Publish batches while the PUBACK window and the unconfirmed cap allow."""
        cfg = self._config
        while len(self._window) < cfg.max_inflight and self._buffer.inflight_batches() < cfg.max_unacked_batches:
            now = self._clock.monotonic()
            # Events go at once; a partial live batch waits batch_max_wait_s for company, without
            # holding up the backlog behind it.
            lanes = tuple(lane for lane in self._buffer.LANES if lane != LIVE_LANE or now >= self._live_take_at)
            records = self._buffer.take(
                cfg.batch_max_records, timeout_s=cfg.ack_timeout_s, backlog_allowance=self._bucket.allowance(), lanes=lanes
            )
            if not records:
                break
            self._publish_batch(client, records)
            if len(records) < cfg.batch_max_records and self._buffer.lane_of(records[0]) == LIVE_LANE:
                self._live_take_at = now + cfg.batch_max_wait_s

    def _publish_batch(self, client: mqtt.Client, records: list[Record]) -> None:
        payload, content_type = encode_batch(self._device_id, records, self._config.wire_version)
        backlog = records[-1].seq < self._buffer.live_from_seq
        if backlog and records[0].priority == 1:
            self._bucket.spend(len(records))
        props = None
        if self._use_v5:
            props = Properties(PacketTypes.PUBLISH)
            # The content type names format and version; every byte of a PUBLISH is paid for on a
            # cellular plan, so nothing else repeats them (docs/wire-format.md, BENCHMARKS.md).
            props.ContentType = content_type
            props.UserProperty = [("backlog", "1" if backlog else "0")]
        topic = self.topic("telemetry")
        if props is not None and self._telemetry_alias is not None:
            # A topic alias (MQTT 5 3.3.2.3.4): the topic name travels once per connection.
            props.TopicAlias = TELEMETRY_ALIAS
            if self._telemetry_alias:
                topic = ""
            self._telemetry_alias = True
        info = client.publish(topic, payload, qos=1, properties=props)
        self._window[info.mid] = _Sent(seq_ranges([r.seq for r in records]), len(records))
        self._stats["published_batches"] += 1
        self._stats["published_records"] += len(records)
        self._stats["last_publish_utc"] = self._clock.wall()

    # -- paho callbacks (in this link's thread, inside client.loop) ------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._connack_refused = str(reason_code)
            if self._use_v5 and self._config.protocol == "auto" and reason_code.value == UNSUPPORTED_PROTOCOL:
                self._use_v5 = False
                self._connack_refused += " (trying MQTT 3.1.1 next)"
        else:
            alias_max = getattr(properties, "TopicAliasMaximum", 0) if properties is not None else 0
            # None: no alias on this connection; False: allowed, not yet set; True: set.
            self._telemetry_alias = False if alias_max >= TELEMETRY_ALIAS else None
            self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        if self._session_error is None:
            if reason_code.value == KEEPALIVE_TIMEOUT:
                self._session_error = f"no answer within the keepalive ({self._config.keepalive_s} s): a silent link"
            else:
                self._session_error = self._paho_error or str(reason_code)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        sent = self._window.pop(mid, None)
        if sent is None:
            return
        if reason_code.is_failure:
            self._state("refused", f"the broker refused a telemetry batch: {reason_code}; it stays buffered", logging.WARNING)
            return
        if self._config.ack == "broker":
            self._buffer.ack(sent.ranges)
            self._stats["acked_batches"] += 1

    def _on_message(self, client, userdata, message) -> None:
        if message.topic == self.topic("ack"):
            try:
                ranges = parse_ack(message.payload)
            except (ValueError, KeyError) as exc:
                log.warning("ignoring a malformed ack on %s: %s", message.topic, exc)
                return
            self._buffer.ack(ranges)
            self._stats["acked_batches"] += 1
            self._stats["last_ack_utc"] = self._clock.wall()
            return
        callback = self._subs.get(message.topic)
        if callback is not None:
            try:
                callback(bytes(message.payload))
            except Exception:  # another module's bug must not take the link down
                log.exception("handler for %s failed", message.topic)

    def _on_log(self, client, userdata, level, buf) -> None:
        # The first error of an attempt is the cause (e.g. the TLS alert); later ones are consequences.
        if level == mqtt.MQTT_LOG_ERR and self._paho_error is None:
            self._paho_error = buf

    # -- helpers ------------------------------------------------------------------------------

    def _status_payload(self, state: str, reason: str | None = None) -> bytes:
        doc: dict = {"state": state, "device": self._device_id, "version": __version__}
        if state == "online":
            doc.update(utc=self._clock.wall(), config_hash=self._config_hash, buffer_depth=self._buffer.stats()["depth"])
            doc.update(self._status_extra)
        if reason:
            doc["reason"] = reason
        return json.dumps(doc, separators=(",", ":")).encode()

    def _state(self, state: str, message: str, level: int) -> None:
        """Log a state change once: each distinct reason once per outage, never once per retry."""
        self._stats["state"] = state
        if state == "up":
            self._said.clear()
        else:
            self._stats["last_error"] = message
        if message not in self._said:
            self._said.add(message)
            log.log(level, "%s", message)


def _describe_socket_error(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: the broker's certificate was not accepted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
