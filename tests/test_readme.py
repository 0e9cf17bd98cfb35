"""The README and docs stay true to the tree: the layout block names what exists, and every local link resolves."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "legend"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def layout_paths(readme: str) -> list[str]:
    """The paths the README's Layout block lists, relative to the repository root.

    A line at column 0 names a path from the root; an indented line names one inside the last column-0 folder.
    """
    section = readme.split("\n## Layout\n", 1)[1]
    block = section.split("```", 2)[1].split("\n", 1)[1]
    paths, folder = [], ""
    for line in block.splitlines():
        if not line.strip():
            continue
        name = line.split()[0]
        if line[0].isspace():
            paths.append(folder + name)
        else:
            folder = name if name.endswith("/") else ""
            paths.append(name)
    return paths


def anchors(markdown: str) -> Iterator[str]:
    """GitHub's anchor for each heading: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    for line in FENCE.sub("", markdown).splitlines():
        if match := re.match(r"#{1,6} (.*)", line):
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            seen[slug] = seen.get(slug, -1) + 1
            yield slug if seen[slug] == 0 else f"{slug}-{seen[slug]}"


def broken_links(page: Path) -> list[str]:
    """Each link of a markdown page to a local file (or a heading in one) that does not resolve."""
    text = page.read_text()
    broken = []
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in set(anchors(resolved.read_text())):
            broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    return broken


def test_layout_block_lists_what_exists():
    listed = layout_paths((ROOT / "README.md").read_text())
    missing = [path for path in listed if not (ROOT / path).exists() or path.endswith("/") != (ROOT / path).is_dir()]
    assert not missing, f"README's Layout block lists paths that are not in the tree: {missing}"


def test_layout_block_lists_every_package_and_module():
    listed = set(layout_paths((ROOT / "README.md").read_text()))
    ours = [p for p in PACKAGE.iterdir() if (p / "__init__.py").exists() or (p.suffix == ".py" and not p.name.startswith("__"))]
    unlisted = sorted(p.name for p in ours if f"src/legend/{p.name}{'/' if p.is_dir() else ''}" not in listed)
    assert not unlisted, f"README's Layout block does not list {unlisted}: add a line for each under src/legend/"


def test_every_local_link_in_readme_and_docs_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    broken = [link for page in pages for link in broken_links(page)]
    assert not broken, "links to local files that do not resolve:\n" + "\n".join(broken)
