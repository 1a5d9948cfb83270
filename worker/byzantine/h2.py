"""Just enough HTTP/2 (RFC 9113) and HPACK (RFC 7541) to open a gRPC call by hand and never
finish its request — what the `slowloris` protocol attack needs and grpcio cannot do (its
client sends a request message whole or not at all).

Sending: the client connection preface, SETTINGS, one HEADERS frame whose header block uses only
"literal header field without indexing — new name" representations (no Huffman, no dynamic
table: valid HPACK that needs no encoder state), and DATA frames of a few bytes. Receiving: the
frames are split and only SETTINGS and PING are answered (ACKs, as a live peer must, or the
server drops the connection); everything else is read and ignored, GOAWAY and a reset of our
stream end the connection.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
_FRAME_HEADER = 9


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """One frame: 24-bit length, type, flags, 31-bit stream id, payload."""
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags, stream) + payload


def hpack_integer(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """An HPACK integer with an N-bit prefix, OR-ed into the first byte's high bits `first`."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_literal(headers: Sequence[tuple[str, str]]) -> bytes:
    """A header block of literal fields without indexing, new names, raw (non-Huffman) strings."""
    block = bytearray()
    for name, value in headers:
        block.append(0x00)
        for text in (name.encode(), value.encode()):
            block += hpack_integer(len(text), 7) + text
    return bytes(block)


def grpc_headers(
    authority: str, path: str, metadata: Sequence[tuple[str, str]] = ()
) -> list[tuple[str, str]]:
    """The request headers of a gRPC call over plaintext HTTP/2 (no deadline: the call may
    stay open for as long as its peer allows)."""
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        *metadata,
    ]


def grpc_message_prefix(length: int) -> bytes:
    """The 5-byte gRPC length prefix of an uncompressed message of `length` bytes."""
    return struct.pack(">BI", 0, length)


@dataclass(frozen=True)
class Frame:
    kind: int
    flags: int
    stream: int
    payload: bytes


class FrameReader:
    """Splits received bytes into frames (a frame may arrive across several reads)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[Frame]:
        self._buffer += data
        while len(self._buffer) >= _FRAME_HEADER:
            length = int.from_bytes(self._buffer[:3], "big")
            if len(self._buffer) < _FRAME_HEADER + length:
                return
            kind, flags, stream = struct.unpack(">BBI", self._buffer[3:_FRAME_HEADER])
            payload = bytes(self._buffer[_FRAME_HEADER : _FRAME_HEADER + length])
            del self._buffer[: _FRAME_HEADER + length]
            yield Frame(kind, flags, stream & 0x7FFFFFFF, payload)


class PeerClosed(Exception):
    """The server ended the connection or our stream (EOF, GOAWAY, RST_STREAM)."""


def answer(sock: socket.socket, frames: Iterator[Frame], stream: int) -> None:
    """Acknowledge SETTINGS and PING as a live peer must; PeerClosed on GOAWAY or a reset of
    `stream`; ignore the rest (WINDOW_UPDATE, HEADERS of an early error answer, …)."""
    for f in frames:
        if f.kind == SETTINGS and not f.flags & ACK:
            sock.sendall(frame(SETTINGS, ACK, 0))
        elif f.kind == PING and not f.flags & ACK:
            sock.sendall(frame(PING, ACK, 0, f.payload))
        elif f.kind == GOAWAY or (f.kind == RST_STREAM and f.stream == stream):
            raise PeerClosed(f"frame type {f.kind}")
        elif f.kind == HEADERS and f.stream == stream and f.flags & END_STREAM:
            raise PeerClosed("the server answered the call")
