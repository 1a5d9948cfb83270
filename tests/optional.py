"""Optional data and tools, for every test module that needs one.

Some suites need what a bare machine with Python and PyPI lacks: the Fashion-MNIST files (a
Debian package), kubectl, hadolint, openssl, root for network namespaces. Without them the
README's test command must still end green, so those tests skip with a one-line reason naming
what to install. CI installs all of them and sets BYZPS_REQUIRE_DATASETS=1 and
BYZPS_REQUIRE_TOOLS=1, which turn each of those skips into a failure: CI still proves them.
"""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest

#: Environment switches that make a missing data set or tool fail the test instead of skipping.
REQUIRE_DATASETS = "BYZPS_REQUIRE_DATASETS"
REQUIRE_TOOLS = "BYZPS_REQUIRE_TOOLS"


def unavailable(reason: str, *, kind: str = "tool") -> NoReturn:
    """Skip the calling test because `reason` (what is missing and how to get it); fail instead
    when the matching BYZPS_REQUIRE_* switch is set."""
    switch = REQUIRE_DATASETS if kind == "dataset" else REQUIRE_TOOLS
    if os.environ.get(switch) == "1":
        pytest.fail(f"{reason} ({switch}=1 makes it required)")
    pytest.skip(reason)


def need_tool(tool: str, package: str | None = None) -> str:
    """The path of `tool` on PATH, or skip/fail (see `unavailable`) naming what provides it."""
    path = shutil.which(tool)
    if path is None:
        unavailable(f"{tool} is not installed" + (f" ({package})" if package else ""))
    return path


def need_fashion_mnist() -> None:
    """Skip/fail unless the Fashion-MNIST IDX files can be found."""
    from byzps.common.tasks.fmnist import resolve_data_dir

    try:
        resolve_data_dir()
    except FileNotFoundError:
        unavailable(
            "Fashion-MNIST data absent: apt-get install dataset-fashion-mnist", kind="dataset"
        )
