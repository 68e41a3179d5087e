"""Wire formats of telemetry batches, shared by the agent (encode) and the collector (decode).

Formats are registered by version, so a later format (issue 6's compact v2) is one more module and
one more :func:`register` call; the publisher and the collector never name a format's internals::

    payload, content_type = encode_batch("truck-7", records)          # the newest default, v1
    batch = decode_batch(payload, content_type)                       # Batch(device_id, records, version)

:func:`decode_batch` raises :class:`WireError` on anything malformed, never another exception.
"""

from __future__ import annotations

from agent.wire.codec import Batch, Codec, WireError, codecs, decode_batch, encode_batch, register
from agent.wire import columnar as _columnar
from agent.wire import v1_json as _v1_json

register(_v1_json.CODEC)
register(_columnar.CODEC)  # v2: docs/wire-format.md, "Format v2"

__all__ = ["Batch", "Codec", "WireError", "codecs", "decode_batch", "encode_batch", "register"]
