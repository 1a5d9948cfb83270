"""deploy/smoke.sh for real: the image built offline with podman, the main job run in it.

The script builds deploy/Dockerfile with no network (a Debian base made by mmdebstrap, wheels
fetched on the host), runs the README's main job as a `--network none` pod — the server, each
honest worker and the cohort in hardened containers of their own (`byzps deploy podman`) — and
compares the final parameters with `byzps simulate` in the same image (the launch test's
tolerance); the server must stop gracefully on SIGTERM. This test runs it, shows its figures
(build time, run time, the equality figure) and checks that it left no pod behind.

Needs root, podman, runc, catatonit and mmdebstrap (installed with apt when absent and allowed,
tests/deploy_support.py; otherwise skipped with the reason). Minutes on a loaded 2-core machine:
the build installs torch.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_support import need_packages, need_root

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "deploy" / "smoke.sh"


def _pods() -> set[str]:
    done = subprocess.run(
        ["podman", "pod", "ps", "--format", "{{.Name}}"],
        capture_output=True, text=True, timeout=60, check=True,
        env={**os.environ, "CONTAINERS_CONF": str(ROOT / "deploy" / "podman" / "containers.conf")},
    )  # fmt: skip
    return set(done.stdout.split())


def test_the_image_builds_offline_and_runs_the_main_job_like_the_simulator() -> None:
    need_root("rootful podman")
    need_packages(["podman", "runc", "catatonit", "mmdebstrap"],
                  ["podman", "runc", "catatonit", "mmdebstrap"])  # fmt: skip
    before = _pods()
    done = subprocess.run(
        ["bash", str(SMOKE)], capture_output=True, text=True, timeout=3000,
        env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip
    print(done.stdout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "container smoke: passed" in done.stdout
    figure = re.search(r"relative error ([-+.e0-9]+),", done.stdout)
    assert figure is not None and float(figure.group(1)) < 1e-5
    stop = re.search(r"server stopped by SIGTERM in (\d+) ms, exit code (\d+)", done.stdout)
    assert stop is not None, done.stdout
    assert int(stop.group(2)) == 0 and int(stop.group(1)) < 10_000
    assert "root fs refuses writes" in done.stdout and "uid 10001" in done.stdout
    assert "CapEff 0000000000000000" in done.stdout  # no capability at all
    assert _pods() == before
