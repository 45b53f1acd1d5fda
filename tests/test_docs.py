"""The README and the docs site point at things that exist, and name every config and command there is.

``make docs`` builds the site with ``mkdocs build --strict`` (CI runs it), which refuses broken links inside
``docs/``. This test also covers the README (read on GitHub, outside the site), runs without mkdocs, and checks
what a link checker cannot: that the README stays a guide of a few screens, and that the config and command
lists name every file in ``configs/`` and every ``reid-lab`` command (the old README listed one experiment
config of seven and three of thirteen commands).
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

from reid_lab.cli import LIGHTNING_COMMANDS, SUBCOMMANDS

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where a ``[x](y)`` is not a link."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """A heading's anchor as mkdocs' toc extension makes it (GitHub's agrees for plain ASCII headings)."""
    value = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode("ascii")
    value = re.sub(r"[^\w\s-]", "", value).strip().lower()
    return re.sub(r"[-\s]+", "-", value)


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    found = {slug(h) for h in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M)}
    return found | set(re.findall(r'<a id="([^"]+)"', text))


def links(page: Path) -> list[str]:
    return [t for t in LINK.findall(_prose(page.read_text())) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_points_at_an_existing_file_and_heading(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.is_file():
            broken.append(f"{target} (no file {file})")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no heading #{anchor} in {file.relative_to(REPO)})")
    assert not broken, f"{page.relative_to(REPO)}: broken links: {broken}"


def test_the_checker_finds_a_broken_file_and_a_broken_anchor(tmp_path):
    """The link check itself on a constructed page: one good link, a missing file, a missing heading."""
    (tmp_path / "a.md").write_text("# Title\n\n## Two words\n\n[ok](b.md#the-head) [x](gone.md) [y](b.md#nope)\n"
                                   "`[code](not-a-link.md)`\n")
    (tmp_path / "b.md").write_text("# B\n\n## The head\n")
    assert links(tmp_path / "a.md") == ["b.md#the-head", "gone.md", "b.md#nope"]
    assert anchors(tmp_path / "b.md") == {"b", "the-head"}
    assert slug("Before training: raw pixels and untrained features") == \
        "before-training-raw-pixels-and-untrained-features"


def test_the_readme_is_a_guide_of_a_few_screens():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) < 200
    assert readme.split("```bash\n", 1)[1].startswith("make demo"), "the README opens with its set-up commands"
    assert "<!-- demo-results:start -->" in readme and "<!-- demo-results:end -->" in readme
    for page in ("docs/results.md", "docs/guide/configs.md", "docs/development.md"):
        assert f"({page}" in readme, f"README.md links no {page}"


def test_the_config_page_names_every_config_file():
    page = (REPO / "docs/guide/configs.md").read_text()
    files = sorted([*(REPO / "configs").rglob("*.yaml"), *(REPO / "experiments").glob("*.yaml")])
    assert files
    missing = [str(f.relative_to(REPO)) for f in files if f"`{f.stem}`" not in page]
    assert not missing, f"docs/guide/configs.md does not name: {missing}"


def test_the_code_layout_names_every_reid_lab_command():
    page = (REPO / "docs/development.md").read_text()
    row = next(line for line in page.splitlines() if line.startswith("| `reid_lab/cli.py`"))
    missing = [c for c in [*SUBCOMMANDS, *LIGHTNING_COMMANDS] if f"`{c}`" not in row]
    assert not missing, f"docs/development.md, the cli.py row, does not name: {missing}"
