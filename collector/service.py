"""The collector service: subscribe, decode, store exactly once, then acknowledge.

paho's network thread only hands messages to a bounded queue; one worker thread decodes everything
waiting, stores it in one committed transaction (group commit: one fsync for many batches), and only
then publishes each device's ack (``{prefix}/{device}/ack``, ``{"ranges": [[first, last], ...]}``)
and PUBACKs the broker (paho ``manual_ack``), so nothing is confirmed that is not on disk.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from collector.broker_auth import apply_credentials
from agent.config import TlsConfig
from agent.wire import WireError, decode_batch
from collector.store import DeadLetter, Incoming, SqliteStore, Store

log = logging.getLogger(__name__)

# Messages handed from paho's thread to the worker; a full queue slows paho down (backpressure).
QUEUE_SIZE = 2000
# At most this many messages per transaction.
GROUP_MAX = 500
# A payload larger than this is not decoded (dead letter): no device sends batches this big.
MAX_PAYLOAD = 4 * 1024 * 1024


def ack_payload(seqs: list[int]) -> bytes:
    """The ack document for ``seqs``: ``{"ranges": [[first, last], ...]}`` (inclusive, ascending)."""
    ranges: list[list[int]] = []
    for seq in sorted(set(seqs)):
        if ranges and seq == ranges[-1][1] + 1:
            ranges[-1][1] = seq
        else:
            ranges.append([seq, seq])
    return json.dumps({"ranges": ranges}, separators=(",", ":")).encode()


class Collector:
    """One collector process's work, usable in-process by tests and the demo.

    ``Collector(host, port, topic_prefix, db_path).start()`` ... ``.stop()``; ``.stats()`` for figures.
    """

    def __init__(
        self,
        host: str,
        port: int,
        topic_prefix: str,
        db_path: str | Path | None = None,
        *,
        store: Store | None = None,
        client_id: str = "telematics-collector",
        session_expiry_s: int = 86400,
        username: str | None = None,
        password: str | None = None,
        tls: TlsConfig | None = None,
        share_group: str | None = None,
    ) -> None:
        if store is None and db_path is None:
            raise ValueError("Collector needs db_path or store")
        self.host, self.port, self.prefix = host, port, topic_prefix
        self.db_path = db_path
        self._store = store
        self._client_id = client_id
        self._session_expiry_s = session_expiry_s
        self._auth = (username, password)
        self._tls = tls
        # MQTT 5 shared subscription (section 4.8.2): the broker gives each message to one member.
        self._filter = f"{topic_prefix}/+/telemetry"
        if share_group is not None:
            self._filter = f"$share/{share_group}/{self._filter}"
        self._queue: queue.Queue = queue.Queue(QUEUE_SIZE)
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._client: mqtt.Client | None = None
        self._connected = threading.Event()
        self._counts = {
            "batches": 0,
            "records_stored": 0,
            "records_duplicate": 0,
            "dead_letters": 0,
            "acks_sent": 0,
            "store_errors": 0,
        }

    # -- life cycle ---------------------------------------------------------------------------

    def start(self, wait_connected: float = 10.0) -> "Collector":
        """Open the store, connect (paho reconnects by itself), start the worker."""
        if self._store is None:
            self._store = SqliteStore(self.db_path)
        self._stop.clear()
        self._worker = threading.Thread(target=self._work, name="collector-store", daemon=True)
        self._worker.start()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self._client_id, protocol=MQTTProtocolVersion.MQTTv5, manual_ack=True
        )
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.reconnect_delay_set(1, 30)
        apply_credentials(client, self._tls, *self._auth)
        props = Properties(PacketTypes.CONNECT)
        # A persistent session: the broker keeps our subscription and queues telemetry while we are down.
        props.SessionExpiryInterval = self._session_expiry_s
        client.connect_async(self.host, self.port, keepalive=30, clean_start=False, properties=props)
        self._client = client
        client.loop_start()
        if wait_connected and not self._connected.wait(wait_connected):
            log.warning("collector: broker %s:%d not reachable yet; retrying in the background", self.host, self.port)
        return self

    def stop(self) -> None:
        """Disconnect, store what was received, close the store."""
        if self._client is not None:
            self._connected.clear()  # an intended disconnect: no warning
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None
        self._stop.set()
        if self._worker is not None:
            self._worker.join()
            self._worker = None
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self) -> "Collector":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> dict:
        """Counters since start: batches, records_stored, records_duplicate, dead_letters, acks_sent, ..."""
        return {**self._counts, "connected": self._connected.is_set(), "queued": self._queue.qsize()}

    # -- paho callbacks (paho's thread) -------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("collector: broker %s:%d refused the connection: %s", self.host, self.port, reason_code)
            return
        client.subscribe(self._filter, qos=1)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        # Ready only once the broker confirmed the subscription: nothing published after start() is missed.
        if any(rc.is_failure for rc in reason_codes):
            log.error("collector: the broker refused the subscription to %s: %s", self._filter, reason_codes[0])
            return
        self._connected.set()
        log.info("collector: connected to %s:%d, subscribed to %s", self.host, self.port, self._filter)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self._connected.is_set():
            log.warning("collector: disconnected from %s:%d (%s); reconnecting", self.host, self.port, reason_code)
        self._connected.clear()

    def _on_message(self, client, userdata, message) -> None:
        self._queue.put((message.topic, bytes(message.payload), message.properties, message.mid, message.qos, time.time()))

    # -- the worker ---------------------------------------------------------------------------

    def _work(self) -> None:
        while not (self._stop.is_set() and self._queue.empty()):
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            group = [first]
            while len(group) < GROUP_MAX:
                try:
                    group.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._handle(group)

    def _handle(self, group: list) -> None:
        batches: list[Incoming] = []
        dead: list[DeadLetter] = []
        for topic, payload, props, _mid, _qos, received in group:
            content_type = getattr(props, "ContentType", None) if props is not None else None
            device = self._device_of(topic)
            try:
                if device is None:
                    raise WireError(f"topic {topic!r} is not {self.prefix}/<device>/telemetry")
                if len(payload) > MAX_PAYLOAD:
                    raise WireError(f"payload of {len(payload)} bytes is over the {MAX_PAYLOAD} byte limit")
                batch = decode_batch(payload, content_type)
                if batch.device_id != device:
                    raise WireError(f"the batch names device {batch.device_id!r} but came on {device!r}'s topic")
            except WireError as exc:
                dead.append(DeadLetter(topic, content_type, str(exc)[:500], payload, received))
                continue
            backlog = any(k == "backlog" and v == "1" for k, v in (getattr(props, "UserProperty", None) or []))
            batches.append(Incoming(device, batch.records, backlog, received))
        try:
            inserted = self._store.store(batches, dead)
        except Exception as exc:  # the database failed: nothing is acknowledged, the devices send again
            self._counts["store_errors"] += 1
            log.error("collector: storing %d batches failed, not acknowledged: %s", len(batches), exc)
            return
        total = sum(len(b.records) for b in batches)
        self._counts["batches"] += len(batches)
        self._counts["records_stored"] += inserted
        self._counts["records_duplicate"] += total - inserted
        if dead:
            self._counts["dead_letters"] += len(dead)
            log.warning("collector: %d payloads stored as dead letters, e.g. %s", len(dead), dead[0].reason)
        self._acknowledge(batches, group)

    def _acknowledge(self, batches: list[Incoming], group: list) -> None:
        """After the commit: one ack per device on its ack topic, then PUBACK every message to the broker."""
        client = self._client
        if client is None:
            return
        seqs: dict[str, list[int]] = {}
        for batch in batches:
            seqs.setdefault(batch.device, []).extend(r.seq for r in batch.records)
        for device, device_seqs in seqs.items():
            client.publish(f"{self.prefix}/{device}/ack", ack_payload(device_seqs), qos=1)
            self._counts["acks_sent"] += 1
        for _topic, _payload, _props, mid, qos, _received in group:
            if qos > 0:
                client.ack(mid, qos)

    def _device_of(self, topic: str) -> str | None:
        head, tail = f"{self.prefix}/", "/telemetry"
        if not (topic.startswith(head) and topic.endswith(tail)):
            return None
        device = topic[len(head) : -len(tail)]
        return device if device and "/" not in device else None
