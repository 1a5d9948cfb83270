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
