"""The README stays short, and every relative link of the documentation reaches its target.

README.md is held to 250 lines (issue 21: what it is, two commands, the quickstarts, shipping,
compose; the rest in docs/). Every relative link in README.md, docs/*.md and the other Markdown
files of the repository must name a file that exists and, with a `#fragment`, a heading of that
file (GitHub's anchors: lower case, punctuation dropped, spaces as hyphens, repeats numbered).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from scripts.stack import ROOT

README_MAX_LINES = 250
DOCUMENTS = sorted(
    [
        ROOT / "README.md",
        ROOT / "CHANGELOG.md",
        ROOT / "CONTRIBUTING.md",
        ROOT / "bench/README.md",
        ROOT / "clients/python/README.md",
        ROOT / "deploy/standin/README.md",
        *(ROOT / "docs").glob("*.md"),
    ]
)
# [text](target) outside code; autolinks (<http://...>) and absolute URLs are not checked.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def slug(heading: str) -> str:
    """Return GitHub's anchor for a heading's text."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor the file's headings make (outside code blocks), repeats numbered."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for match in re.finditer(r"^#{1,6} +(.+?) *#*$", FENCE.sub("", path.read_text()), re.M):
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(path: Path) -> list[str]:
    """The relative links of a Markdown file whose file or anchor does not exist."""
    text = INLINE_CODE.sub("", FENCE.sub("", path.read_text()))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        name, _, fragment = target.partition("#")
        linked = (path.parent / name).resolve() if name else path
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(f"{target}: no heading makes #{fragment}")
    return broken


def test_the_readme_is_at_most_250_lines() -> None:
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_reaches_its_file_and_heading(path: Path) -> None:
    assert broken_links(path) == []


def test_the_readme_links_every_page_of_docs() -> None:
    linked = set(LINK.findall((ROOT / "README.md").read_text()))
    pages = {f"docs/{page.name}" for page in (ROOT / "docs").glob("*.md")}
    assert sorted(pages - linked) == [], "pages of docs/ the README's contents do not list"


def test_the_checker_finds_a_missing_file_and_a_missing_heading(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## What `/stats` means\n\n## Twice\n## Twice\n")
    page.write_text(
        "# Page\n\n[ok](other.md#what-stats-means) [ok](other.md#twice-1) [ok](#page)\n"
        "[gone](missing.md) [no anchor](other.md#nothing) [web](https://example.com/x#y)\n"
        "`[in code](nowhere.md)`\n\n```md\n[in a block](nowhere.md)\n```\n"
    )
    assert broken_links(page) == [
        "missing.md: no such file",
        "other.md#nothing: no heading makes #nothing",
    ]
