"""The host <-> worker event stream: StreamingMessages, each framed as gRPC frames a message.

FunctionRpc's one call is a bidirectional stream (`EventStream`). The dev host keeps its messages
and framing (a 1-byte compressed flag, 0 here, and a 4-byte big-endian length, then the protobuf
bytes: gRPC's length-prefixed message) but carries them over a socket pair the worker inherits
rather than HTTP/2 on a loopback port: what the worker reads is byte for byte the message the
Functions host sends, at a fraction of grpcio's cost per message, and no other process can
connect in the worker's place.
"""

from __future__ import annotations

import asyncio
import struct

from google.protobuf.message import DecodeError

from .protos import StreamingMessage

_PREFIX = struct.Struct(">BI")
MAX_MESSAGE_BYTES = 2**31 - 1  # the host's --grpcMaxMessageLength for Python workers


class StreamClosed(ConnectionError):
    """The other side went away (or broke the framing): no more messages on this stream."""


def frame(message: StreamingMessage) -> bytes:
    body = message.SerializeToString()
    return _PREFIX.pack(0, len(body)) + body


async def read(reader: asyncio.StreamReader) -> StreamingMessage:
    try:
        compressed, length = _PREFIX.unpack(await reader.readexactly(_PREFIX.size))
        if compressed:
            raise StreamClosed("compressed frames are not used on this stream")
        body = await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError) as err:
        raise StreamClosed(str(err) or type(err).__name__) from None
    message = StreamingMessage()
    try:
        message.ParseFromString(body)
    except DecodeError as err:
        raise StreamClosed(f"not a StreamingMessage: {err}") from None
    return message
