"""Helpers for the transport tests: an in-process device (buffer + MQTT link), a TCP proxy that can
go silent, and reads of the collector's database."""

from __future__ import annotations

import socket
import sqlite3
import threading
from pathlib import Path

from agent.buffer.store import DurableBuffer
from agent.clock import SystemClock
from agent.config import BufferConfig, MqttConfig
from agent.publish.mqtt_link import MqttLink
from agent.record import Event, Fix, Record


class Device:
    """A durable buffer and an MQTT link running in a thread, as the agent composes them."""

    def __init__(self, data_dir: Path, port: int, device_id: str = "truck-1", commit_window_s: float = 0.1,
                 clock_plausible=None, **mqtt) -> None:
        mqtt.setdefault("batch_max_wait_s", 0.05)
        mqtt.setdefault("ack_timeout_s", 3.0)
        mqtt.setdefault("reconnect_min_s", 0.1)
        mqtt.setdefault("reconnect_max_s", 0.5)
        self.device_id = device_id
        self.buffer = DurableBuffer(data_dir, BufferConfig(commit_window_s=commit_window_s), SystemClock())
        self.config = MqttConfig(port=port, **mqtt)
        self.link = MqttLink(self.config, device_id, self.buffer, SystemClock(), clock_plausible=clock_plausible)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.appended: list[Record] = []
        self._i = 0

    def start(self) -> "Device":
        self.buffer.open()
        self.buffer.start()
        self._stop.clear()
        self._thread = threading.Thread(target=self.link.run, args=(self._stop,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)
            assert not self._thread.is_alive(), "the link thread did not stop"
        self.buffer.close()

    def drive(self, n: int, events_every: int = 25) -> list[Record]:
        """Append ``n`` fixes (and an event every ``events_every``), utc increasing with seq."""
        batch = []
        for _ in range(n):
            i = self._i
            self._i += 1
            batch.append(Record(utc=1.7e9 + i, mono=float(i), data=Fix(lat=48.0 + i * 1e-5, lon=11.5, speed_mps=12.0)))
            if events_every and i % events_every == 0:
                batch.append(Record(utc=1.7e9 + i, mono=float(i), data=Event(type="stop_approach", attrs={"n": i})))
        self.buffer.append(batch)
        self.appended.extend(batch)
        return batch


def stored(db: Path, device: str = "truck-1") -> list[tuple[int, str, float]]:
    """(seq, kind, utc) rows of ``device`` in the collector's database, by seq."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        return conn.execute("SELECT seq, kind, utc FROM records WHERE device = ? ORDER BY seq", (device,)).fetchall()


def count(db: Path, device: str = "truck-1") -> int:
    if not Path(db).exists():
        return 0
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        return conn.execute("SELECT count(*) FROM records WHERE device = ?", (device,)).fetchone()[0]


def assert_exactly_once_in_order(db: Path, appended: list[Record], device: str = "truck-1") -> None:
    rows = stored(db, device)
    seqs = [r[0] for r in rows]
    assert len(seqs) == len(set(seqs))
    assert seqs == sorted(r.seq for r in appended), "every appended record stored, none twice"
    for kind in {r[1] for r in rows}:
        utcs = [r[2] for r in rows if r[1] == kind]
        assert utcs == sorted(utcs), f"{kind} stream out of order"


class SilentProxy:
    """A TCP proxy to the broker that can stop forwarding without closing (a dead cellular link),
    or cut every connection."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port = self._listener.getsockname()[1]
        self.forwarding = threading.Event()
        self.forwarding.set()
        self._closed = False
        self._sockets: list[socket.socket] = []
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def pause(self) -> None:
        """Stop forwarding; connections stay open, bytes are held back."""
        self.forwarding.clear()

    def resume(self) -> None:
        self.forwarding.set()

    def cut(self) -> None:
        """Close every connection abruptly."""
        for sock in list(self._sockets):
            try:
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            except OSError:
                pass
        self._sockets.clear()

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self.forwarding.is_set():
                # A dead link: the SYN is answered by the kernel, nothing more ever arrives.
                self._sockets.append(client)
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.connections += 1
            self._sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                return
            self.forwarding.wait()
            if src not in self._sockets:
                return
            try:
                dst.sendall(data)
            except OSError:
                return
