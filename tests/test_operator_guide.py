"""systemd/README.md, the operator's guide: what it links exists, the figures it quotes are the
ones bench/RESULTS.md measured, the commands it names exist, and no developer notes are left."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "systemd" / "README.md"


def guide() -> str:
    return GUIDE.read_text(encoding="utf-8")


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_the_guide_has_the_operators_sections_and_no_developer_notes() -> None:
    text = guide()
    headings = re.findall(r"^## (.+)$", text, re.M)
    for needed in (
        "Backup and restore",
        "Upgrade and rollback",
        "Uninstall",
        "Logs: volume and retention",
        "TLS",
        "Monitoring",
        "Capacity",
    ):
        assert needed in headings, needed
    for developer_note in ("Wiring", "xfail", "pytest", "daemon.py"):
        assert developer_note not in text, developer_note


def test_the_guides_links_point_at_files_and_headings_that_exist() -> None:
    for target in re.findall(r"\]\(([^)]+)\)", guide()):
        path, _, fragment = target.partition("#")
        linked = (GUIDE.parent / path).resolve()
        assert linked.is_file(), target
        if fragment:
            headings = re.findall(r"^#+ (.+)$", linked.read_text(encoding="utf-8"), re.M)
            assert fragment in {anchor(h) for h in headings}, target
    # Named, not linked: the files another part of the docs must provide.
    for named in (
        "docs/SCALING.md",
        "docs/PROTOCOL.md",
        "bench/RESULTS.md",
        "build/service-user.sh",
    ):
        assert named in guide() and (ROOT / named).is_file(), named


def test_the_capacity_figures_are_the_measured_ones() -> None:
    capacity = guide().split("## Capacity", 1)[1].split("\n## ", 1)[0]
    results = (ROOT / "bench" / "RESULTS.md").read_text(encoding="utf-8")
    figures = re.findall(r"\b\d{1,3}(?:,\d{3})+\b|\b\d+\.\d+ MB\b|\b\d+ KiB\b", capacity)
    assert len(figures) >= 8, figures
    for figure in figures:
        if figure in ("10,000", "5,000", "1,000", "100,000", "200,000", "400,000"):
            continue  # the loads themselves and round sums, not measurements
        assert figure in results, figure
