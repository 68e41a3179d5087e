"""Downloads: HTTPS (a local server with a test CA) that drops the connection mid-file resumes with
Range requests; chunks over MQTT (a real Mosquitto) arrive out of order, twice or not at all, and are
reassembled; the byte-rate cap holds."""

from __future__ import annotations

import http.server
import json
import queue
import random
import ssl
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from agent.ota.download import (ByteRate, ChunkAssembler, DownloadFailed, decode_chunk, download_https, download_mqtt,
                                encode_chunk, iter_chunks, part_path)
from test_publish_tls import Pki

PAYLOAD = random.Random(7).randbytes(700_000)


class Server(http.server.ThreadingHTTPServer):
    """HTTPS on 127.0.0.1 serving PAYLOAD at /r.tar; the first ``drops`` responses stop after ``cut`` bytes."""

    daemon_threads = True

    def __init__(self, context: ssl.SSLContext, drops: int = 0, cut: int = 0, ranges: bool = True) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.socket = context.wrap_socket(self.socket, server_side=True)
        self.drops, self.cut, self.ranges = drops, cut, ranges
        self.requests: list[str | None] = []

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server_address[1]}/r.tar"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        server: Server = self.server  # type: ignore[assignment]
        asked = self.headers.get("Range")
        server.requests.append(asked)
        start = int(asked.split("=")[1].rstrip("-")) if asked and server.ranges else 0
        body = PAYLOAD[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.drops > 0:
            server.drops -= 1
            self.wfile.write(body[: server.cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)  # the link drops mid-file
            return
        self.wfile.write(body)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    ca = Pki(tmp_path_factory.mktemp("pki"), "update-ca")
    cert, key = ca.issue("updates", server=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return ca, context


def serve(context: ssl.SSLContext, **kwargs) -> Server:
    server = Server(context, **kwargs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_download_cut_in_the_middle_resumes_where_it_stopped(pki, tmp_path):
    ca, context = pki
    server = serve(context, drops=3, cut=150_000)
    try:
        dest = tmp_path / "r.tar"
        got = download_https(server.url, dest, len(PAYLOAD), ca_file=ca.ca_file, rate=ByteRate(0, threading.Event()),
                             stop=threading.Event(), retry_s=0.05)
        assert got == dest and dest.read_bytes() == PAYLOAD and not part_path(dest).exists()
        # The first request from the start, then each one from where the last stopped.
        assert server.requests == [None, "bytes=150000-", "bytes=300000-", "bytes=450000-"]
    finally:
        server.shutdown()


def test_a_server_that_ignores_ranges_is_read_from_the_start(pki, tmp_path):
    ca, context = pki
    server = serve(context, drops=1, cut=100_000, ranges=False)
    try:
        dest = tmp_path / "r.tar"
        download_https(server.url, dest, len(PAYLOAD), ca_file=ca.ca_file, rate=ByteRate(0, threading.Event()),
                       stop=threading.Event(), retry_s=0.05)
        assert dest.read_bytes() == PAYLOAD
        assert server.requests == [None, "bytes=100000-"]
    finally:
        server.shutdown()


def test_a_server_with_a_certificate_of_another_ca_is_refused(pki, tmp_path):
    _, context = pki
    other = Pki(tmp_path, "other-ca")
    server = serve(context)
    try:
        with pytest.raises(DownloadFailed, match="CERTIFICATE_VERIFY_FAILED"):
            download_https(server.url, tmp_path / "r.tar", len(PAYLOAD), ca_file=other.ca_file,
                           rate=ByteRate(0, threading.Event()), stop=threading.Event(), attempts=2, retry_s=0.01)
        assert not (tmp_path / "r.tar").exists()
    finally:
        server.shutdown()


def test_plain_http_is_not_fetched(tmp_path):
    with pytest.raises(DownloadFailed, match="only https"):
        download_https("http://127.0.0.1:1/r.tar", tmp_path / "r.tar", 10, ca_file=None,
                       rate=ByteRate(0, threading.Event()), stop=threading.Event())


def test_the_byte_rate_cap_holds(pki, tmp_path):
    ca, context = pki
    server = serve(context)
    try:
        start = time.monotonic()
        download_https(server.url, tmp_path / "r.tar", len(PAYLOAD), ca_file=ca.ca_file,
                       rate=ByteRate(1_000_000, threading.Event()), stop=threading.Event())
        # 700 kB at 1 MB/s: not faster than the cap allows (less the first 64 KiB block's head start).
        assert time.monotonic() - start >= (len(PAYLOAD) - 65536) / 1_000_000
    finally:
        server.shutdown()


# -- chunks over MQTT -----------------------------------------------------------------------------


class Backend:
    """The fleet's side: answers update/request with the chunks asked for, shuffled, some twice,
    and (to stand in for lost messages) skips each chunk in ``lose`` the first time it is asked for."""

    def __init__(self, port: int, archive: Path, version: str, chunk_size: int, lose: set[int]) -> None:
        self.chunks = dict(iter_chunks(archive, version, chunk_size))
        self.lose = set(lose)
        self.requests: list[dict] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"backend-{uuid.uuid4().hex[:6]}")
        self.client.on_message = self._on_request
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("telematics/truck-1/update/request", qos=1)
        self.client.loop_start()

    def _on_request(self, client, userdata, message) -> None:
        request = json.loads(message.payload)
        self.requests.append(request)
        wanted = [i for first, last in request["chunks"] for i in range(first, last + 1)]
        rng = random.Random(len(self.requests))
        answer = wanted + rng.sample(wanted, k=len(wanted) // 3)  # duplicates
        rng.shuffle(answer)
        for i in answer:
            if i in self.lose:
                self.lose.discard(i)
                continue
            client.publish("telematics/truck-1/update/chunk", self.chunks[i], qos=1)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class DeviceSide:
    """The device's MQTT link, reduced to what download_mqtt needs."""

    def __init__(self, port: int) -> None:
        self.inbox: queue.Queue[bytes] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"truck-1-{uuid.uuid4().hex[:6]}")
        self.client.on_message = lambda c, u, m: self.inbox.put(m.payload)
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("telematics/truck-1/update/chunk", qos=1)
        self.client.loop_start()

    def request(self, payload: bytes) -> bool:
        return self.client.publish("telematics/truck-1/update/request", payload, qos=1).rc == 0

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_chunks_over_mqtt_out_of_order_duplicated_and_lost_are_reassembled(mosquitto, tmp_path):
    archive = tmp_path / "src.tar"
    archive.write_bytes(PAYLOAD)
    chunk_size = 16_384
    count = -(-len(PAYLOAD) // chunk_size)
    backend = Backend(mosquitto.port, archive, "1.2.0", chunk_size, lose={0, 5, 17, count - 1})
    device = DeviceSide(mosquitto.port)
    time.sleep(0.2)  # both subscriptions in place
    try:
        dest = tmp_path / "dl" / "r.tar"
        dest.parent.mkdir()
        got = download_mqtt(dest, "1.2.0", len(PAYLOAD), chunk_size, request=device.request, inbox=device.inbox,
                            rate=ByteRate(0, threading.Event()), stop=threading.Event(), idle_s=0.3)
        assert got.read_bytes() == PAYLOAD
        assert not part_path(dest).exists() and not dest.with_name("r.tar.chunks").exists()
        # The lost chunks were asked for again.
        asked_twice = [i for i in (0, 5, 17, count - 1)
                       if sum(first <= i <= last for r in backend.requests for first, last in r["chunks"]) >= 2]
        assert asked_twice == [0, 5, 17, count - 1]
    finally:
        backend.close()
        device.close()


def test_mqtt_download_gives_up_when_nobody_answers(tmp_path):
    asked = []
    with pytest.raises(DownloadFailed, match="no chunk for 3 x"):
        download_mqtt(tmp_path / "r.tar", "1.2.0", 5000, 1024, request=lambda p: asked.append(p) or True,
                      inbox=queue.Queue(), rate=ByteRate(0, threading.Event()), stop=threading.Event(), idle_s=0.05,
                      max_idle_rounds=3)
    assert len(asked) == 3
    assert json.loads(asked[0]) == {"version": "1.2.0", "chunk_size": 1024, "chunks": [[0, 4]]}


def test_chunks_received_before_a_restart_are_not_asked_for_again(tmp_path):
    dest = tmp_path / "r.tar"
    data = PAYLOAD[:10_000]
    first = ChunkAssembler(dest, "1.2.0", len(data), 1000)
    for i in (9, 0, 4):
        first.add(i, data[i * 1000:(i + 1) * 1000])
    first.close()
    again = ChunkAssembler(dest, "1.2.0", len(data), 1000)
    assert again.missing() == [1, 2, 3, 5, 6, 7, 8]
    for i in again.missing():
        again.add(i, data[i * 1000:(i + 1) * 1000])
    assert again.finish().read_bytes() == data
    # Another version's leftovers are not reused.
    other = ChunkAssembler(tmp_path / "s.tar", "1.2.0", 3000, 1000)
    other.add(1, b"x" * 1000)
    other.close()
    assert ChunkAssembler(tmp_path / "s.tar", "1.3.0", 3000, 1000).missing() == [0, 1, 2]


def test_a_chunk_of_the_wrong_length_or_index_is_rejected(tmp_path):
    assembler = ChunkAssembler(tmp_path / "r.tar", "1", 2500, 1000)
    with pytest.raises(ValueError, match="expected 500"):
        assembler.add(2, b"x" * 1000)
    with pytest.raises(ValueError, match="beyond"):
        assembler.add(3, b"x")
    assert assembler.missing() == [0, 1, 2]


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=1, max_size=5000), chunk_size=st.integers(1, 700), seed=st.integers(0, 2**32))
def test_any_order_with_repeats_reassembles_the_file(tmp_path_factory, data, chunk_size, seed):
    dest = tmp_path_factory.mktemp("a") / "r.tar"
    source = tmp_path_factory.mktemp("s") / "src"
    source.write_bytes(data)
    messages = [m for _, m in iter_chunks(source, "9", chunk_size)]
    rng = random.Random(seed)
    order = messages + rng.sample(messages, k=len(messages) // 2)
    rng.shuffle(order)
    assembler = ChunkAssembler(dest, "9", len(data), chunk_size)
    for message in order:
        version, index, chunk = decode_chunk(message)
        assembler.add(index, chunk)
    assert assembler.complete and assembler.finish().read_bytes() == data


@given(version=st.text(min_size=1, max_size=20), index=st.integers(0, 2**40), data=st.binary(max_size=300))
def test_chunk_codec_round_trips(version, index, data):
    assert decode_chunk(encode_chunk(version, index, data)) == (version, index, data)


@given(st.one_of(st.binary(max_size=64),
                 st.builds(lambda h, d: len(h).to_bytes(4, "big") + h + d, st.binary(max_size=40), st.binary(max_size=8)),
                 st.builds(lambda j: len(j).to_bytes(4, "big") + j, st.sampled_from([b"[]", b"1", b'{"index": -1}', b"null"]))))
def test_garbage_chunks_raise_value_error_only(payload):
    try:
        decode_chunk(payload)
    except ValueError:
        pass
