"""The registry of wire formats by version and the two calls everyone uses."""

from __future__ import annotations

from typing import Protocol, Sequence

import msgspec

from agent.record import Record


class WireError(ValueError):
    """A payload that no registered format can decode, or a batch that cannot be encoded."""


class Batch(msgspec.Struct, frozen=True):
    """A decoded telemetry batch: whose records, and in which format version they travelled."""

    device_id: str
    records: list[Record]
    version: int


class Codec(Protocol):
    """One wire format version."""

    version: int
    content_type: str

    def encode(self, device_id: str, records: Sequence[Record]) -> bytes: ...

    def decode(self, payload: bytes) -> Batch: ...

    def sniff(self, payload: bytes) -> bool:
        """True when ``payload`` looks like this format (for payloads without a content type)."""


_BY_VERSION: dict[int, Codec] = {}
_BY_CONTENT_TYPE: dict[str, Codec] = {}


def register(codec: Codec) -> None:
    """Make ``codec`` available to :func:`encode_batch` and :func:`decode_batch`."""
    _BY_VERSION[codec.version] = codec
    _BY_CONTENT_TYPE[codec.content_type] = codec


def codecs() -> dict[int, Codec]:
    """The registered formats by version."""
    return dict(_BY_VERSION)


def encode_batch(device_id: str, records: Sequence[Record], version: int = 1) -> tuple[bytes, str]:
    """Encode ``records`` (each with its ``seq``) as one batch: returns (payload, content type)."""
    codec = _BY_VERSION.get(version)
    if codec is None:
        raise WireError(f"unknown wire format version {version} (known: {sorted(_BY_VERSION)})")
    return codec.encode(device_id, records), codec.content_type


def decode_batch(payload: bytes, content_type: str | None = None) -> Batch:
    """Decode a batch; the content type picks the format, or the payload's first bytes when it is None.

    Raises :class:`WireError` naming what is wrong (unknown content type, bad framing, bad schema).
    """
    if content_type:
        codec = _BY_CONTENT_TYPE.get(content_type)
        if codec is None:
            raise WireError(f"unknown content type {content_type!r}")
    else:
        codec = next((c for c in _BY_VERSION.values() if c.sniff(payload)), None)
        if codec is None:
            raise WireError(f"no known wire format starts with {bytes(payload[:4]).hex() or 'an empty payload'}")
    return codec.decode(payload)
