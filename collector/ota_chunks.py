"""The backend's side of updates over MQTT: answers devices' chunk requests from a directory of releases.

A device asks on ``{prefix}/{device}/update/request`` with ``{"version": V, "chunk_size": N,
"chunks": [[first, last], ...]}``; the server reads ``{releases}/telematics-agent-{V}.tar`` and
publishes each chunk asked for on ``{prefix}/{device}/update/chunk`` (agent/ota/download.py has the
format). It holds no state per device: a device that lost chunks simply asks for them again.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from collector.broker_auth import apply_credentials
from agent.config import TlsConfig
from agent.ota.download import encode_chunk
from agent.ota.update import VERSION_RE

log = logging.getLogger(__name__)

# Chunks answered per request at most (a device asks for 16 at a time); bounds what one message costs.
MAX_CHUNKS_PER_REQUEST = 64
MAX_CHUNK_SIZE = 16 * 1024 * 1024  # as agent/ota/update.py accepts


class ChunkServer:
    """Serves release chunks to devices over MQTT from ``releases_dir``."""

    def __init__(self, host: str, port: int, topic_prefix: str, releases_dir: str | Path, *,
                 tls: TlsConfig | None = None) -> None:
        self.host, self.port, self.prefix = host, port, topic_prefix
        self.releases = Path(releases_dir)
        self._tls = tls
        self._client: mqtt.Client | None = None
        self.counts = {"chunks": 0, "refused": 0}

    def chunks_for(self, payload: bytes) -> list[bytes]:
        """The chunk messages answering one request; ValueError says why there are none."""
        request = json.loads(payload)
        if not isinstance(request, dict):
            raise ValueError("the request is not a JSON object")
        version, size, wanted = request.get("version"), request.get("chunk_size"), request.get("chunks")
        if not isinstance(version, str) or not VERSION_RE.match(version):
            raise ValueError(f"bad version {version!r}")
        if not isinstance(size, int) or not 0 < size <= MAX_CHUNK_SIZE:
            raise ValueError(f"bad chunk_size {size!r}")
        indices = [i for pair in wanted or [] for i in range(int(pair[0]), int(pair[1]) + 1)]
        if not indices or len(indices) > MAX_CHUNKS_PER_REQUEST:
            raise ValueError(f"ask for 1 to {MAX_CHUNKS_PER_REQUEST} chunks at a time")
        archive = self.releases / f"telematics-agent-{version}.tar"
        messages = []
        with open(archive, "rb") as fh:
            for index in indices:
                fh.seek(index * size)
                data = fh.read(size)
                if not data:
                    raise ValueError(f"chunk {index} is beyond the end of {archive.name}")
                messages.append(encode_chunk(version, index, data))
        return messages

    def start(self) -> "ChunkServer":
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"telematics-updates-{uuid.uuid4().hex[:8]}")
        client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{self.prefix}/+/update/request", qos=1)
        client.on_message = self._on_message
        apply_credentials(client, self._tls)
        client.connect(self.host, self.port, keepalive=30)
        client.loop_start()
        self._client = client
        return self

    def _on_message(self, client, userdata, message) -> None:
        device_id = message.topic[len(self.prefix) + 1:].split("/", 1)[0]
        try:
            chunks = self.chunks_for(bytes(message.payload))
        except (OSError, ValueError, TypeError, IndexError) as exc:
            self.counts["refused"] += 1
            log.warning("update chunk request of %s not served: %s", device_id, exc)
            return
        for chunk in chunks:
            client.publish(f"{self.prefix}/{device_id}/update/chunk", chunk, qos=1)
        self.counts["chunks"] += len(chunks)

    def stop(self) -> None:
        if self._client is not None:
            self._client.loop_stop()
            self._client.disconnect()
            self._client = None
