"""Every relative link in the repository's Markdown (README, docs/, result reports) points at a file that exists
and, where it names a heading (``file.md#heading``), at a heading that exists: moved results or renamed sections
would otherwise leave the README pointing nowhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "runs", "node_modules"}
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _markdown_files() -> list[Path]:
    return sorted(p for p in REPO.rglob("*.md") if not SKIP_DIRS & set(p.relative_to(REPO).parts))


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (``-`` and ``_`` kept), spaces to ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings; a repeated heading gets ``-1``, ``-2``, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.+)", line)
        if m:
            slug = github_anchor(m.group(1))
            out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return out


def _relative_links() -> list[tuple[Path, str]]:
    links = []
    for path in _markdown_files():
        for target in LINK.findall(FENCE.sub("", path.read_text())):
            if not re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: are not checked (no network)
                links.append((path, target))
    return links


def test_the_anchor_rule() -> None:
    assert (
        github_anchor("Experiment: the stages recipe on one H200 GPU") == "experiment-the-stages-recipe-on-one-h200-gpu"
    )
    assert github_anchor("Ablation (issues 6, 20): `ablation.md`") == "ablation-issues-6-20-ablationmd"


def test_the_readme_has_links_to_check() -> None:
    readme = [target for path, target in _relative_links() if path == REPO / "README.md"]
    assert len(readme) >= 20 and any("#" in target for target in readme)


@pytest.mark.parametrize(
    ("path", "target"), _relative_links(), ids=lambda v: str(v.relative_to(REPO)) if isinstance(v, Path) else v
)
def test_relative_link_resolves(path: Path, target: str) -> None:
    file, _, anchor = target.partition("#")
    dest = (path.parent / file).resolve() if file else path
    assert dest.exists(), f"{path.relative_to(REPO)} links to {target}: no such file"
    if anchor and dest.suffix == ".md":
        assert anchor in anchors(dest), f"{path.relative_to(REPO)} links to {target}: no such heading"
