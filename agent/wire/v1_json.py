"""Wire format v1: a zlib-compressed JSON object per batch (docs/wire-format.md, byte by byte).

Chosen for the foundation because every language decodes it with its standard library; issue 6's
v2 optimises the bytes on the wire.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import msgspec

from agent.record import Record
from agent.wire.codec import Batch, WireError

VERSION = 1
CONTENT_TYPE = "application/vnd.telematics.batch.v1+json+zlib"
# A decompressed batch larger than this is refused: a few bytes of deflate can expand a thousandfold.
MAX_DECOMPRESSED = 16 * 1024 * 1024
# zlib level 6 is zlib's own default; higher levels gain almost nothing on telemetry JSON.
LEVEL = 6


class _Body(msgspec.Struct, forbid_unknown_fields=True):
    v: int
    device: str
    records: list[Record]


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(_Body)


class _V1Codec:
    version = VERSION
    content_type = CONTENT_TYPE

    def encode(self, device_id: str, records: Sequence[Record]) -> bytes:
        if any(r.seq is None for r in records):
            raise WireError("every record of a batch needs its sequence number (assigned by the buffer)")
        return zlib.compress(_encoder.encode(_Body(VERSION, device_id, list(records))), LEVEL)

    def sniff(self, payload: bytes) -> bool:
        # RFC 1950: CMF 0x78 is deflate with a 32 KiB window; CMF*256+FLG is a multiple of 31.
        return len(payload) >= 2 and payload[0] == 0x78 and (payload[0] * 256 + payload[1]) % 31 == 0

    def decode(self, payload: bytes) -> Batch:
        inflater = zlib.decompressobj()
        try:
            text = inflater.decompress(payload, MAX_DECOMPRESSED)
        except zlib.error as exc:
            raise WireError(f"v1: not a zlib stream: {exc}") from exc
        if inflater.unconsumed_tail:
            raise WireError(f"v1: decompressed batch larger than {MAX_DECOMPRESSED} bytes")
        if not inflater.eof:
            raise WireError("v1: truncated zlib stream")
        if inflater.unused_data:
            raise WireError("v1: bytes after the end of the zlib stream")
        try:
            body = _decoder.decode(text)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise WireError(f"v1: {exc}") from exc
        if body.v != VERSION:
            raise WireError(f"v1: the body says version {body.v}")
        if any(r.seq is None or r.seq < 0 for r in body.records):
            raise WireError("v1: a record without a valid seq")
        return Batch(body.device, body.records, VERSION)


CODEC = _V1Codec()
