"""The documentation: the README is a short front door, every relative link in it and in docs/ resolves inside the
repository (files and `#anchors`, by GitHub's heading slugs), "method §N" in the code names a section of
docs/method.md, and the README's Python example runs."""
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT

README_MAX_LINES = 160
FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def markdown_files() -> list[Path]:
    "README.md, docs/*.md and the READMEs of experiments/ and benchmarks/."
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return files + [p for p in (ROOT / "experiments" / "README.md", ROOT / "benchmarks" / "README.md") if p.exists()]


def prose_lines(text: str):
    "(line number, line) of every line outside fenced code blocks."
    fenced = False
    for i, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced: yield i, line


def slug(heading: str) -> str:
    "GitHub's anchor of a heading: its text, lower case, punctuation dropped (not - or _), spaces -> hyphens."
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    "Every heading anchor of a Markdown file (a repeated slug gets -1, -2, ... as on GitHub)."
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text()):
        m = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m: continue
        s = slug(m.group(1))
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


def links(path: Path):
    "(line number, target) of every Markdown link and image outside code (fenced blocks and inline spans)."
    for i, line in prose_lines(path.read_text()):
        for m in LINK.finditer(re.sub(r"`[^`]*`", "``", line)): yield i, m.group(1)


def test_slug_follows_github():
    assert slug("What `make repro` does") == "what-make-repro-does"
    assert slug("The data world: pictograms, seen and unseen") == "the-data-world-pictograms-seen-and-unseen"
    assert slug("5. Similarity, loss, sparsity") == "5-similarity-loss-sparsity"
    assert slug("Training: nothing lost, bit for bit") == "training-nothing-lost-bit-for-bit"


def test_readme_is_a_short_front_door():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move material into docs/"


@pytest.mark.parametrize("md", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(md):
    "Every relative link names a file or folder inside the repository, and an anchor names a heading of its file."
    bad = []
    for i, target in links(md):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I): continue  # http:, https:, mailto:
        where, _, anchor = target.partition("#")
        dest = (md.parent / where).resolve() if where else md
        if not dest.is_relative_to(ROOT): bad.append(f"{md.name}:{i}: {target} leaves the repository")
        elif not dest.exists(): bad.append(f"{md.name}:{i}: {target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{md.name}:{i}: {target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, "\n".join(bad)


def test_markdown_cites_the_repositorys_own_method_notes():
    "The method notes live in docs/method.md; no page points outside the repository for them."
    for md in markdown_files():
        assert "shared/docs" not in md.read_text(), f"{md.relative_to(ROOT)} cites shared/docs: use docs/method.md"


def test_method_sections_cited_by_the_code_exist():
    "Every `method §N` in the library and notebooks is a numbered section `## N.` of docs/method.md."
    sections = {int(m) for m in re.findall(r"^## (\d+)\. ", (ROOT / "docs" / "method.md").read_text(), re.M)}
    cited = set()
    for p in [*(ROOT / "lexvla").glob("*.py"), *(ROOT / "notebooks").glob("*.ipynb")]:
        cited |= {int(n) for n in re.findall(r"method §(\d+)", p.read_text())}
    assert cited and cited <= sections, f"cited but missing in docs/method.md: {sorted(cited - sections)}"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    "The README's Python example (load, encode, search, explain), on the tiny model in place of a trained one."
    import torch
    import lexvla.model
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) == 1, "the README has one Python example"
    model = lexvla.model.create_model("tiny").eval()
    with torch.no_grad():  # trainable weights moved off their init, as training would
        for p in model.parameters():
            if p.requires_grad: p.add_(0.02 * torch.randn_like(p))
    monkeypatch.setattr(lexvla.model, "load_trained", lambda folder, device="cpu": model)
    (tmp_path / "my_images").mkdir()
    for i in range(3):
        px = np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(px).save(tmp_path / "my_images" / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    printed = []  # the example's `print` (a global of the exec'd code shadows the builtin)
    exec(compile(blocks[0], "README.md", "exec"), {"print": lambda *a: printed.append(a)})
    assert len(printed) == 3 and {a[0] for a in printed} == {"0.png", "1.png", "2.png"}
    assert all(isinstance(w, str) for a in printed for w, _ in a[2])
