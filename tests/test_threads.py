"""Worker daemons cap their compute threads: n of them on one machine must not each start a
pool as wide as the machine (their idle threads spin against each other)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from byzps.cli.launch import threads_each


@pytest.mark.parametrize("processes", [1, 2, 20, 1000])
def test_launch_gives_each_worker_process_its_share_of_the_cores(processes: int) -> None:
    cores = os.cpu_count() or 1
    assert threads_each(processes) == max(1, cores // processes)


def test_the_threads_option_caps_torch_and_numba_pools() -> None:
    probe = (
        "import click, numba, torch\n"
        "from byzps.cli.daemon_common import daemon_options\n"
        "@click.command()\n"
        "@daemon_options\n"
        "def cmd(**kw):\n"
        "    print(torch.get_num_threads(), numba.get_num_threads())\n"
        "cmd(['--server', 'x:1', '--threads', '1'])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.split() == ["1", "1"]


def test_daemon_commands_start_with_idle_threads_sleeping() -> None:
    probe = (
        "import os, sys\n"
        "from byzps.cli import main as m\n"
        "import click\n"
        "@m.main.command('worker-probe')\n"
        "def probe():\n"
        "    print(os.environ.get('OMP_WAIT_POLICY'))\n"
        "m.DAEMONS = m.DAEMONS | {'worker-probe'}\n"
        "m.main(['worker-probe'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.stdout.split() == ["PASSIVE"], out.stderr


def test_daemons_keep_freed_memory_where_the_c_library_allows_it() -> None:
    """glibc takes both mallopt settings (in a child: they last for the process); another C
    library is left alone without an error."""
    import platform

    probe = "from byzps.cli.daemon_common import keep_freed_memory\nprint(keep_freed_memory())\n"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == str(platform.libc_ver()[0] == "glibc")


#: A child that prints, for blocks of 48 MiB (ĝ's size class at d = 1e7, above the 32 MiB every
#: glibc allows) and of 88 MiB (above a d = 1e7 server's limit), whether glibc maps them apart
#: from its heap (mallinfo2's hblkhd): with a daemon's default setting, then with a d = 1e7
#: server's.
_MAPPED_APART = """
import ctypes
from byzps.cli.daemon_common import keep_freed_memory, server_heap_blocks

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split())]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def mapped_apart(size):
    block = libc.malloc(size)
    mapped = libc.mallinfo2().hblkhd
    libc.free(block)
    return mapped >= size

for setting in (lambda: keep_freed_memory(), lambda: keep_freed_memory(server_heap_blocks(10**7))):
    setting()
    print(mapped_apart(48 << 20), mapped_apart(88 << 20))
"""


def test_a_server_takes_vectors_not_states_from_its_heap() -> None:
    """Where glibc takes thresholds above 32 MiB (2.36 does): a daemon's default keeps mapping a
    48 MiB block apart (twenty workers on one machine must not each hold their peak); a d = 1e7
    server's setting serves it from the heap (ĝ's size class there) while a block past one
    d-sized int64 vector, such as its n × d states, is still mapped apart."""
    import platform

    lib, version = platform.libc_ver()
    if lib != "glibc" or tuple(int(v) for v in version.split(".")[:2]) < (2, 33):
        pytest.skip(f"needs glibc >= 2.33 (mallinfo2); have {lib} {version}")
    takes = "import ctypes; print(ctypes.CDLL(None).mallopt(-3, 1 << 30))"
    taken = subprocess.run([sys.executable, "-c", takes], capture_output=True, text=True).stdout
    if taken != "1\n":
        pytest.skip(f"glibc {version} refuses heap blocks above 32 MiB: the server keeps 32 MiB")
    out = subprocess.run(
        [sys.executable, "-c", _MAPPED_APART], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["True", "True", "False", "True"]


@pytest.mark.parametrize(
    ("dim", "blocks"), [(1, 32 << 20), (10**7, 8 * 10**7 + (1 << 20)), (10**9, 1 << 30)]
)
def test_the_server_limit_is_one_vector_within_what_mallopt_takes(dim: int, blocks: int) -> None:
    """One d-sized 8-byte vector and 1 MiB, clamped to [32 MiB, 1 GiB]: mallopt takes a C int,
    and ctypes wraps a larger value silently, so the clamp is what keeps it meaningful. glibc
    takes every value the clamp lets through (in a child, whose malloc settings end with it)."""
    import platform

    from byzps.cli.daemon_common import server_heap_blocks

    assert server_heap_blocks(dim) == blocks
    probe = (
        "from byzps.cli.daemon_common import keep_freed_memory, server_heap_blocks\n"
        f"print(keep_freed_memory(server_heap_blocks({dim})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == str(platform.libc_ver()[0] == "glibc")
