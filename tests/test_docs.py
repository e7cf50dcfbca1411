"""The README is a front page and the docs/ pages hang together: every relative link and image in
README.md and docs/*.md points at a file that exists, every `#anchor` at a heading of the target page
(GitHub's anchor rules), and every docs page is reachable from the README."""
import re
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

FENCE = re.compile(r"^\s*(```|~~~)")
# [text](target) and ![alt](target); the text may span lines, the target has no spaces
LINK = re.compile(r"!?\[([^\]]*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"`+[^`]*?`+")


def _prose_lines(text):
    """The lines outside fenced code blocks (blank lines stand in for the fenced ones)."""
    out, fenced = [], None
    for line in text.splitlines():
        m = FENCE.match(line)
        if m:
            if fenced is None:
                fenced = m.group(1)
            elif m.group(1) == fenced:
                fenced = None
            out.append("")
            continue
        out.append("" if fenced else line)
    return out


def slug(heading):
    """GitHub's anchor for a heading: lowercase, markdown punctuation dropped (backticks, link syntax),
    every character that is not alphanumeric, a space, '-' or '_' removed, spaces -> '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.strip().lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(path):
    """Every anchor of a markdown file, duplicates suffixed -1, -2, ... as GitHub does."""
    seen, result = Counter(), set()
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        anchor = base if seen[base] == 0 else f"{base}-{seen[base]}"
        seen[base] += 1
        result.add(anchor)
    return result


def links(path):
    """(line number, target) of every markdown link and image outside code."""
    lines = _prose_lines(path.read_text(encoding="utf-8"))
    text = "\n".join(INLINE_CODE.sub(lambda m: " " * len(m.group(0)), line) for line in lines)
    found = []
    for m in LINK.finditer(text):
        found.append((text.count("\n", 0, m.start()) + 1, m.group(2)))
    return found


def _external(target):
    return re.match(r"^(https?:|mailto:)", target, re.I) is not None


def test_slug_rules():
    assert slug("Precision: fp16, int8, int8-wo (`tops_edge/calib/`)") == "precision-fp16-int8-int8-wo-tops_edgecalib"
    assert slug("What `tops-export` writes") == "what-tops-export-writes"
    assert slug("Host RAM to export LLaVA-1.5-7B's decoder") == "host-ram-to-export-llava-15-7bs-decoder"
    assert slug("Measured: fp32 / fp16 / int8 / int8-wo") == "measured-fp32--fp16--int8--int8-wo"


def test_readme_is_a_front_page():
    text = README.read_text(encoding="utf-8")
    n = len(text.splitlines())
    assert n <= 250, f"README.md has {n} lines; move the detail to a docs/ page"
    for needed in ("pip install", "pytest -q", "tops-export --model shapes-llava"):
        assert needed in text, f"README.md lacks {needed!r}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for lineno, target in links(page):
        if _external(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / unquote(file_part)).resolve() if file_part else page
        where = f"{page.relative_to(ROOT)}:{lineno}: {target}"
        if not dest.exists():
            broken.append(f"{where} (no such file)")
            continue
        if anchor:
            if dest.suffix != ".md" or dest.is_dir():
                broken.append(f"{where} (an anchor into a file that is not markdown)")
            elif unquote(anchor) not in anchors(dest):
                broken.append(f"{where} (no heading with that anchor in {dest.relative_to(ROOT)})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_docs_page_is_reachable_from_the_readme():
    assert DOCS, "docs/ has no markdown pages"
    linked = set()
    for _, target in links(README):
        if _external(target):
            continue
        file_part = target.partition("#")[0]
        if file_part:
            linked.add((ROOT / unquote(file_part)).resolve())
    missing = [str(p.relative_to(ROOT)) for p in DOCS if p.resolve() not in linked]
    assert not missing, f"docs pages not linked from README.md: {missing}"
