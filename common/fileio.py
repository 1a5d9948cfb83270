"""Low-level durable writes shared by the server's log and checkpoints and the worker's checkpoint:
every byte written despite short writes, and renames made durable."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

#: The most buffers one writev takes (POSIX IOV_MAX is at least 1024 on Linux).
IOV_MAX = 1024


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte of `data` is written (a write may stop short)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def writev_all(fd: int, parts: Sequence[bytes | memoryview]) -> None:
    """os.writev until every byte of `parts` is written (a write may stop short)."""
    views = [memoryview(p) for p in parts if len(p)]
    while views:
        written = os.writev(fd, views[:IOV_MAX])
        while views and written >= views[0].nbytes:
            written -= views[0].nbytes
            views.pop(0)
        if written:
            views[0] = views[0][written:]


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (a no-op where directories can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Give `path` new contents, written by `write` into the open file, so that a crash leaves
    either the old file or the whole new one: a temporary beside it, fsynced, renamed over it,
    and the rename made durable."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)
