"""System tools the real-deployment suites need (podman, Slurm), installed with apt on demand.

The suites that run the image with podman and the sbatch script under Slurm need Debian
packages a bare machine lacks. Where installing is allowed — as root, with apt-get, and under
BYZPS_REQUIRE_TOOLS=1 (CI) or BYZPS_INSTALL_TOOLS=1 — `need_packages` installs what is missing;
elsewhere the test is skipped with the apt command to run (a failure under
BYZPS_REQUIRE_TOOLS=1, tests/optional.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess

from optional import REQUIRE_TOOLS, unavailable

#: Opt-in switch for installing missing Debian packages outside CI.
INSTALL_TOOLS = "BYZPS_INSTALL_TOOLS"


def need_root(what: str) -> None:
    """Skip/fail unless running as root (rootful podman, Slurm daemons, namespaces)."""
    if os.geteuid() != 0:
        unavailable(f"{what} needs root")


def need_packages(tools: list[str], packages: list[str]) -> None:
    """Make every program in `tools` available, installing `packages` with apt-get when one is
    missing and installing is allowed; otherwise skip/fail naming the command to run."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if not missing:
        return
    command = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]
    allowed = "1" in (os.environ.get(REQUIRE_TOOLS), os.environ.get(INSTALL_TOOLS))
    if not (allowed and os.geteuid() == 0 and shutil.which("apt-get")):
        unavailable(f"{', '.join(missing)} not installed ({' '.join(command[:2])} "
                    f"{' '.join(packages)})")  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=900,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )  # fmt: skip
    still = [tool for tool in tools if shutil.which(tool) is None]
    if done.returncode != 0 or still:
        unavailable(f"{' '.join(command)} failed: {done.stderr.strip()[-300:]}")
