"""Serialize each round's model answer once, however many workers fetch it.

Why: in a synchronous round all n workers ask for the same thing — x_r densely, or the change of
ĝ — within milliseconds of each other. Encoding it per request (a copy of x, a tobytes, a
protobuf serialization) costs n times what one encoding does, and at d = 1e7 one encoding is
tens of milliseconds. The coordinator hands every caller of a round the same immutable answer
object (`Downlink`); this cache turns that object into its serialized reply messages the first
time (encoded straight to wire bytes: byzps.common.codec's WireParts) and serves the bytes to
everyone after, through a pass-through response serializer.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable

from google.protobuf.message import Message


class EncodedAnswers:
    """answer object → its serialized reply stream, for the last `keep` answers.

    A round has at most three answers (the change of ĝ, x with ĝ, x alone) and only the current
    round is ever served, so three entries hold everything still useful (at d = 1e7 a dense
    answer is 40–80 MB). Keyed by identity: answers are immutable snapshots that the
    coordinator reuses for every caller of a round, and an entry keeps its answer alive, so an
    id is never reused while cached. Concurrent callers of a new answer wait for the one that
    encodes it.
    """

    def __init__(self, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.keep = keep
        self._lock = threading.Lock()
        self._entries: OrderedDict[int, tuple[object, list[bytes]]] = OrderedDict()

    def get(self, answer: object, encode: Callable[[object], Iterable[bytes]]) -> list[bytes]:
        """The wire messages `encode(answer)`, computed at most once per answer."""
        with self._lock:
            entry = self._entries.get(id(answer))
            if entry is not None and entry[0] is answer:
                self._entries.move_to_end(id(answer))
                return entry[1]
            messages = list(encode(answer))
            self._entries[id(answer)] = (answer, messages)
            while len(self._entries) > self.keep:
                self._entries.popitem(last=False)
            return messages


def passthrough(serialize: Callable[[Message], bytes]) -> Callable[[bytes | Message], bytes]:
    """A response serializer that sends pre-serialized bytes as they are and serializes
    messages with `serialize`."""

    def serializer(reply: bytes | Message) -> bytes:
        return reply if isinstance(reply, bytes) else serialize(reply)

    return serializer
