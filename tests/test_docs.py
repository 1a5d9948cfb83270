"""The documentation stays true: the generated config reference is current, every component has a
section in docs/algorithms.md, every relative link resolves, and nothing points at files that
users of byzps never have (the project's private spec)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from byzps.cli.reference import REGENERATE, config_reference
from byzps.common.catalog import registries

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
_HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every anchor a Markdown file defines (repeated headings get -1, -2, … as on GitHub)."""
    seen: dict[str, int] = {}
    found = set(_HTML_ANCHOR.findall(markdown))
    for heading in _HEADING.findall(_FENCE.sub("", markdown)):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def test_config_reference_is_current() -> None:
    committed = _read(DOCS / "config.md")
    assert committed == config_reference(), (
        f"docs/config.md is stale: regenerate it with `{REGENERATE}` (from the repository root)"
    )


def test_every_component_has_a_section_in_algorithms_md() -> None:
    sections = anchors(_read(DOCS / "algorithms.md"))
    missing = [
        f"{registry.kind} {name!r}"
        for registry in registries().values()
        for name in registry.names()
        if name not in sections
    ]
    assert not missing, (
        f"docs/algorithms.md has no section for {', '.join(missing)}: add a heading "
        "'### `NAME`' with its formula and reference under its kind's section"
    )


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    text = _read(path)
    broken = []
    for target in _LINK.findall(_FENCE.sub("", text)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, …
            continue
        file_part, _, fragment = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(_read(linked)):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{path.relative_to(ROOT)}: broken links: {', '.join(broken)}"


def test_no_tracked_file_points_at_the_private_spec() -> None:
    """Users have the repository only: a path out of it, or a citation of the project's private
    spec files, is a dead end for them (docs/algorithms.md and docs/architecture.md say it)."""
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(
        [git, "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    # Spelled in pieces, so this file does not match itself.
    needles = [b"../" + b"shared", b"shared" + b"/spec", b"ALGORITHMS" + b".md"]
    needles.append(b"ARCHITECTURE" + b".md")
    offenders = []
    for name in filter(None, listed):
        path = ROOT / name.decode()
        if not path.is_file():
            continue  # deleted in the working tree
        data = path.read_bytes()
        offenders += [f"{name.decode()}: {n.decode()}" for n in needles if n in data]
    assert not offenders, (
        "tracked files refer to the private spec, which users do not have; cite docs/"
        f"algorithms.md or docs/architecture.md instead: {offenders}"
    )
