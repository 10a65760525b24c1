"""Every relative link and image of README.md and docs/*.md resolves, #anchors included (GitHub heading slugs).

The README is what a newcomer reads first and docs/ is where it sends them; a link that points at a moved
section or a renamed file is a dead end. This reads the Markdown itself (no renderer): inline links and images
``[text](target)`` / ``![alt](target)``, reference definitions ``[ref]: target`` and HTML ``href``/``src``
attributes, outside fenced code blocks and inline code. ``http(s):``, ``mailto:`` and other scheme links are
skipped. A target must exist inside the repository; an ``#anchor`` into a Markdown file must match one of its
headings' GitHub slugs (or an HTML ``id``/``name``).
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
#: The docs pages the README hands a reader on to (issue 27).
DOC_PAGES = ["method", "results", "outputs", "configuration", "cluster", "images", "development", "findings"]
#: The two Quickstart commands, exactly as CI (.ci/run) and a fresh clone run them.
QUICKSTART = [
    "bash scripts/setup.sh demo && .venv/bin/snakemake --cores all",
    "bash scripts/setup.sh test && .venv/bin/python -m pytest",
]

FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target "title") and ![alt](target); text may hold one level of nested brackets (an image in a link).
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s()]+(?:\([^\s()]*\)[^\s()]*)*)"
                         r"(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
HTML_ATTR = re.compile(r"<(?:a|img|source)\b[^>]*?\b(?:href|src)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
HTML_ID = re.compile(r"<[a-z][^>]*?\b(?:id|name)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def prose_lines(text: str, blank_code: bool = True) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, with inline code spans blanked out (unless not asked)."""
    lines, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
            continue
        if fence is not None:
            if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence) \
                    and not line.strip()[len(match.group(1)):].strip():
                fence = None
            continue
        lines.append((number, INLINE_CODE.sub(lambda m: " " * len(m.group(0)), line) if blank_code else line))
    return lines


def links(path: Path) -> list[tuple[int, str]]:
    """Every link target of a Markdown file, with its line number."""
    found = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        targets = [m.group(1) for m in INLINE_LINK.finditer(line)]
        targets += [m.group(1) for m in REFERENCE_DEF.finditer(line)]
        targets += [m.group(1) for m in HTML_ATTR.finditer(line)]
        found += [(number, t[1:-1] if t.startswith("<") and t.endswith(">") else t) for t in targets]
    return found


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its rendered text, lower-cased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.replace("`", "").replace("**", "").replace("__", "")
    text = re.sub(r"(?<!\w)[*_]|[*_](?!\w)", "", text)  # emphasis markers, not intra-word underscores
    text = text.strip().lower()
    kept = []
    for char in text:
        if char in " -_" or unicodedata.category(char)[0] in "LNM":
            kept.append(char)
    return "".join(kept).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors a Markdown file offers: its headings' GitHub slugs (duplicates numbered) and HTML ids."""
    seen: dict[str, int] = {}
    result = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8"), blank_code=False):
        match = HEADING.match(line)
        if match:
            slug = github_slug(match.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            result.add(slug if count == 0 else f"{slug}-{count}")
    result |= {m.group(1) for m in HTML_ID.finditer(path.read_text(encoding="utf-8"))}
    return result


def broken_links(path: Path, root: Path = REPO) -> list[str]:
    """Problems with the relative links of ``path``: missing targets, targets outside ``root``, unknown anchors."""
    problems = []
    for number, target in links(path):
        if SCHEME.match(target) or target.startswith("//"):
            continue  # http(s), mailto and other absolute URLs are not checked here
        where = f"{path.relative_to(root)}:{number}: {target}"
        file_part, _, anchor = target.partition("#")
        file_part = unquote(file_part.split("?")[0])
        resolved = (path.parent / file_part).resolve() if file_part else path.resolve()
        if resolved != root.resolve() and root.resolve() not in resolved.parents:
            problems.append(f"{where} (outside the repository)")
            continue
        if not resolved.exists():
            problems.append(f"{where} (no such file)")
            continue
        if anchor and resolved.suffix.lower() in (".md", ".markdown"):
            if unquote(anchor).lower() not in anchors(resolved):
                problems.append(f"{where} (no heading '#{anchor}' in {resolved.relative_to(root.resolve())})")
    return problems


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path: Path) -> None:
    assert not broken_links(path), "\n".join(broken_links(path))


def test_readme_hands_on_to_every_docs_page() -> None:
    targets = {target.partition("#")[0] for _, target in links(REPO / "README.md")}
    missing = [page for page in DOC_PAGES if f"docs/{page}.md" not in targets]
    assert not missing, f"README.md links no docs/{{{', '.join(missing)}}}.md"


def test_readme_is_short_and_starts_with_the_quickstart() -> None:
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; the rest belongs in docs/"
    head = "\n".join(lines[:60])
    assert "## Quickstart" in head, "the Quickstart is not within the README's first 60 lines"
    for command in QUICKSTART:
        assert command in head, f"the Quickstart command `{command}` is not within the README's first 60 lines"


def test_every_docs_page_says_what_it_is_for() -> None:
    for path in sorted((REPO / "docs").glob("*.md")):
        text = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        assert text and text[0].startswith("# "), f"{path.name} does not open with a title"
        assert len(text) > 1 and not text[1].startswith("#"), f"{path.name} has no opening sentence under its title"


# ----------------------------------------------------------------------------- the checker itself


def test_github_slugs() -> None:
    assert github_slug("Detection on subjects nobody tuned on (cross-fitting)") == \
        "detection-on-subjects-nobody-tuned-on-cross-fitting"
    assert github_slug("Quality checks (`quality.tsv`)") == "quality-checks-qualitytsv"
    assert github_slug("Physics that is not pathology: augmentation and centring") == \
        "physics-that-is-not-pathology-augmentation-and-centring"
    assert github_slug("DRAEM's synthetic anomalies") == "draems-synthetic-anomalies"
    assert github_slug("Learning the combination from a few labelled patients (opt-in)") == \
        "learning-the-combination-from-a-few-labelled-patients-opt-in"
    assert github_slug("snake_case and **bold** −log10 p") == "snake_case-and-bold-log10-p"


def test_checker_finds_broken_links(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n\n## Two words\n\n## Two words\n", encoding="utf-8")
    page = tmp_path / "README.md"
    page.write_text(
        "# R\n\n"
        "[ok](docs/a.md) [ok](docs/a.md#two-words) [ok](docs/a.md#two-words-1) [ok](#r) ![ok](docs/a.md)\n"
        "[web](https://example.org/x.md#nothing) [mail](mailto:a@b.c)\n"
        "[gone](docs/b.md) [bad anchor](docs/a.md#three) [self](#nowhere) ![img](docs/missing.png)\n"
        "[out](../elsewhere.md)\n"
        "`[code](not/checked.md)`\n\n"
        "```\n[fenced](not/checked.md)\n```\n\n"
        "[ref]: docs/missing-ref.md\n"
        '<img src="docs/missing.svg">\n',
        encoding="utf-8",
    )
    problems = broken_links(page, root=tmp_path)
    flagged = sorted(p.split(": ", 1)[1].split(" (")[0] for p in problems)
    assert flagged == sorted(["docs/b.md", "docs/a.md#three", "#nowhere", "docs/missing.png", "../elsewhere.md",
                              "docs/missing-ref.md", "docs/missing.svg"]), problems
