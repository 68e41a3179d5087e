"""Fetching a release: HTTPS with resume, or chunks over MQTT; both capped in bytes/s.

HTTPS: the file grows as ``<name>.part``; after a dropped connection the next attempt asks for
the rest with an HTTP Range request (RFC 9110 section 14.2) and appends, so a link that drops
every few megabytes still gets there. A server that ignores the range (200 instead of 206) is
read from the start again.

MQTT (for fleets whose firewall allows only the broker): the device asks for chunks on
``{prefix}/{device}/update/request`` with ``{"version": V, "chunk_size": N, "chunks": [[first,
last], ...]}`` and the backend (collector/ota_chunks.py) answers each on
``{prefix}/{device}/update/chunk`` (:func:`encode_chunk`: a 4-byte
big-endian header length, a JSON header ``{"version": V, "index": i}``, then the bytes). Chunks may
arrive in any order and more than once; each is written at its offset, and what has arrived is
saved beside the part file so a restarted agent asks only for the rest. The device asks for a
window at a time, paced by the byte-rate cap, and asks again for what is still missing after
``update.chunk_idle_s`` without a chunk.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import queue
import ssl
import struct
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

log = logging.getLogger(__name__)

BLOCK = 64 * 1024
HEADER = struct.Struct(">I")
# Chunks asked for at once over MQTT: enough to keep the link busy, few enough to re-ask cheaply.
WINDOW_CHUNKS = 16
# Seconds between saves of the received-chunks list (each save fsyncs the part file first).
SAVE_INTERVAL_S = 2.0


class DownloadFailed(Exception):
    """The release could not be fetched (after retries); the message says why."""


class ByteRate:
    """A pacing cap in bytes/s (0: none); ``spend(n)`` waits, on ``stop``, until ``n`` bytes are allowed."""

    def __init__(self, rate: float, stop: threading.Event, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.rate, self._stop, self._monotonic = rate, stop, monotonic
        self._start = monotonic()
        self._spent = 0

    def spend(self, n: int) -> None:
        if self.rate <= 0:
            return
        self._spent += n
        ahead = self._spent / self.rate - (self._monotonic() - self._start)
        if ahead > 0:
            self._stop.wait(ahead)


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _ssl_context(ca_file: str | None) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca_file)


def download_https(url: str, dest: Path, size: int, *, ca_file: str | None, rate: ByteRate, stop: threading.Event,
                   attempts: int = 20, retry_s: float = 1.0, timeout_s: float = 30.0) -> Path:
    """Fetch ``url`` (``size`` bytes) to ``dest``, resuming after drops; DownloadFailed after ``attempts`` tries."""
    if not url.startswith("https://"):
        raise DownloadFailed(f"{url}: only https:// URLs are fetched")
    part = part_path(dest)
    context = _ssl_context(ca_file)
    failures = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        if have == size:
            os.replace(part, dest)
            return dest
        if have > size:
            part.unlink()
            have = 0
        try:
            _fetch_from(url, part, have, size, context, rate, stop, timeout_s)
        except (OSError, http.client.HTTPException, urllib.error.URLError) as exc:
            if isinstance(exc, urllib.error.HTTPError) and exc.code not in (408, 429, 500, 502, 503, 504):
                raise DownloadFailed(f"{url}: HTTP {exc.code} {exc.reason}") from exc
            failures += 1
            got = part.stat().st_size if part.exists() else 0
            if got > have:
                failures = 0  # progress: the link works, it only drops
            if failures >= attempts:
                raise DownloadFailed(f"{url}: {exc} ({attempts} attempts without progress)") from exc
            log.warning("download of %s interrupted at %d of %d bytes (%s): resuming", url, got, size, exc)
            if stop.wait(retry_s * min(failures, 30)):
                raise DownloadFailed("stopped") from exc
        if stop.is_set():
            raise DownloadFailed("stopped")


def _fetch_from(url: str, part: Path, have: int, size: int, context: ssl.SSLContext, rate: ByteRate,
                stop: threading.Event, timeout_s: float) -> None:
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, context=context, timeout=timeout_s) as response:
        if have and response.status != 206:
            log.info("%s ignores ranges: downloading from the start", url)
            have = 0
        with open(part, "r+b" if have else "wb") as out:
            out.seek(have)
            out.truncate()
            while not stop.is_set():
                block = response.read(min(BLOCK, size - have + 1))
                if not block:
                    break
                have += len(block)
                if have > size:
                    raise DownloadFailed(f"{url}: more than the announced {size} bytes")
                out.write(block)
                rate.spend(len(block))
            out.flush()
            os.fsync(out.fileno())
    if have < size and not stop.is_set():
        raise ConnectionError(f"the server closed the connection after {have} of {size} bytes")


def encode_chunk(version: str, index: int, data: bytes) -> bytes:
    """One chunk message: header length, JSON header, data."""
    header = json.dumps({"version": version, "index": index}, separators=(",", ":")).encode()
    return HEADER.pack(len(header)) + header + data


def decode_chunk(payload: bytes) -> tuple[str, int, bytes]:
    """(version, index, data) of a chunk message; ValueError when malformed."""
    if len(payload) < HEADER.size:
        raise ValueError("chunk shorter than its header")
    (length,) = HEADER.unpack_from(payload)
    if HEADER.size + length > len(payload):
        raise ValueError("chunk header longer than the message")
    header = json.loads(payload[HEADER.size:HEADER.size + length])
    if not isinstance(header, dict):
        raise ValueError("chunk header is not a JSON object")
    version, index = header.get("version"), header.get("index")
    if not isinstance(version, str) or not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ValueError(f"bad chunk header {header!r}")
    return version, index, payload[HEADER.size + length:]


def iter_chunks(archive: Path, version: str, chunk_size: int) -> Iterator[tuple[int, bytes]]:
    """(index, chunk message) for every chunk of ``archive``: what a backend publishes."""
    with open(archive, "rb") as fh:
        index = 0
        while data := fh.read(chunk_size):
            yield index, encode_chunk(version, index, data)
            index += 1


def ranges(indices: list[int]) -> list[list[int]]:
    """Sorted indices as inclusive [first, last] runs."""
    out: list[list[int]] = []
    for i in sorted(indices):
        if out and i == out[-1][1] + 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out


class ChunkAssembler:
    """Writes chunks of a ``size``-byte file at their offsets, in any order; survives a restart."""

    def __init__(self, dest: Path, version: str, size: int, chunk_size: int) -> None:
        if chunk_size <= 0 or size <= 0:
            raise ValueError("size and chunk_size must be positive")
        self.dest, self.version, self.size, self.chunk_size = dest, version, size, chunk_size
        self.count = -(-size // chunk_size)
        self.part = part_path(dest)
        self._state = dest.with_name(dest.name + ".chunks")
        self.received: set[int] = set()
        saved = self._load()
        if saved is not None and self.part.exists():
            self.received = saved
        else:
            with open(self.part, "wb") as fh:
                fh.truncate(size)
        self._fd = os.open(self.part, os.O_RDWR)
        self._saved_at = time.monotonic()

    def _load(self) -> set[int] | None:
        try:
            state = json.loads(self._state.read_text())
        except (OSError, ValueError):
            return None
        if state.get("version") != self.version or state.get("size") != self.size or state.get("chunk_size") != self.chunk_size:
            return None
        return {i for first, last in state["received"] for i in range(first, last + 1)}

    def _save(self) -> None:
        os.fsync(self._fd)  # the list must never name data that is not on disk
        tmp = self._state.with_name(self._state.name + ".tmp")
        tmp.write_text(json.dumps({"version": self.version, "size": self.size, "chunk_size": self.chunk_size,
                                   "received": ranges(list(self.received))}))
        os.replace(tmp, self._state)
        self._saved_at = time.monotonic()

    @property
    def complete(self) -> bool:
        return len(self.received) == self.count

    def missing(self, limit: int | None = None) -> list[int]:
        out = []
        for i in range(self.count):
            if i not in self.received:
                out.append(i)
                if limit is not None and len(out) >= limit:
                    break
        return out

    def add(self, index: int, data: bytes) -> bool:
        """Store one chunk; True when it was new. ValueError for an index or length that cannot be."""
        if index >= self.count:
            raise ValueError(f"chunk {index} beyond the last ({self.count - 1})")
        expected = min(self.chunk_size, self.size - index * self.chunk_size)
        if len(data) != expected:
            raise ValueError(f"chunk {index} has {len(data)} bytes, expected {expected}")
        if index in self.received:
            return False
        os.pwrite(self._fd, data, index * self.chunk_size)
        self.received.add(index)
        if self.complete or time.monotonic() - self._saved_at > SAVE_INTERVAL_S:
            self._save()
        return True

    def finish(self) -> Path:
        """The complete file at ``dest`` (the part file renamed); the chunk list removed."""
        self._save()
        os.close(self._fd)
        os.replace(self.part, self.dest)
        self._state.unlink(missing_ok=True)
        return self.dest

    def close(self) -> None:
        """Stop without finishing (what arrived is kept for the next attempt)."""
        try:
            self._save()
        finally:
            os.close(self._fd)


def download_mqtt(dest: Path, version: str, size: int, chunk_size: int, *, request: Callable[[bytes], bool],
                  inbox: "queue.Queue[bytes]", rate: ByteRate, stop: threading.Event, idle_s: float,
                  max_idle_rounds: int = 10) -> Path:
    """Ask for and assemble the chunks of ``dest``; ``request(payload)`` publishes on update/request,
    ``inbox`` receives the update/chunk messages. DownloadFailed after ``max_idle_rounds`` silent waits."""
    assembler = ChunkAssembler(dest, version, size, chunk_size)
    idle_rounds = 0
    try:
        while not assembler.complete:
            if stop.is_set():
                raise DownloadFailed("stopped")
            window = assembler.missing(WINDOW_CHUNKS)
            request(json.dumps({"version": version, "chunk_size": chunk_size, "chunks": ranges(window)},
                               separators=(",", ":")).encode())
            progressed = _receive(assembler, set(window), inbox, rate, stop, idle_s)
            idle_rounds = 0 if progressed else idle_rounds + 1
            if idle_rounds >= max_idle_rounds:
                raise DownloadFailed(f"no chunk for {idle_rounds} x {idle_s:g} s: "
                                     f"{len(assembler.received)} of {assembler.count} chunks received")
        return assembler.finish()
    except BaseException:
        if not assembler.complete:
            assembler.close()
        raise


def _receive(assembler: ChunkAssembler, window: set[int], inbox: "queue.Queue[bytes]", rate: ByteRate,
             stop: threading.Event, idle_s: float) -> bool:
    """Store arriving chunks until the window is in or ``idle_s`` passes without one; True on progress."""
    progressed = False
    while window - assembler.received and not stop.is_set():
        try:
            payload = inbox.get(timeout=idle_s)
        except queue.Empty:
            log.info("no update chunk for %g s: asking again for %d", idle_s, len(window - assembler.received))
            return progressed
        try:
            version, index, data = decode_chunk(payload)
            if version != assembler.version:
                continue
            if assembler.add(index, data):
                progressed = True
                rate.spend(len(data))
        except ValueError as exc:
            log.warning("ignoring an update chunk: %s", exc)
    return progressed
