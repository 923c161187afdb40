"""Cross-references into the docs resolve: every `docs/NAME.md` named in the README, the docs,
the code's messages and comments, the scripts and the benchmarks exists, and every section
cited as `docs/NAME.md`, "Title" is a heading of that file. Messages send users there, so a
renamed section must not leave them pointing at nothing."""
from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC_NAME = re.compile(r"docs/([\w-]+\.md)")
# `docs/recipes.md`, "How many view draws": the file, a comma, then the quoted section title
SECTION = re.compile(r"docs/([\w-]+\.md)`?,\s*[\"\u201c]([^\"\u201d]+)[\"\u201d]")


def _python_texts(path: Path) -> list[str]:
    """A Python file's string literals (implicit concatenations joined by the parser, an
    f-string's fields as {}) and its comment blocks, each as one line of text."""
    source = path.read_text()
    texts = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            texts.append(node.value)
        elif isinstance(node, ast.JoinedStr):
            texts.append("".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values))
    block, last_row = [], None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        if last_row is not None and tok.start[0] != last_row + 1:
            texts.append(" ".join(block))
            block = []
        block.append(tok.string.lstrip("#").strip())
        last_row = tok.start[0]
    texts.append(" ".join(block))
    return [" ".join(t.split()) for t in texts]


def _texts() -> dict[Path, list[str]]:
    found = {ROOT / "README.md": [" ".join((ROOT / "README.md").read_text().split())]}
    for path in sorted((ROOT / "docs").glob("*.md")):
        found[path] = [" ".join(path.read_text().split())]
    for folder in ("src", "scripts", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            found[path] = _python_texts(path)
    return found


def _headings(doc: Path) -> list[str]:
    return [" ".join(line.lstrip("#").split()).lower() for line in doc.read_text().splitlines()
            if line.startswith("#")]


def test_every_doc_named_exists():
    missing = sorted({(path.relative_to(ROOT).as_posix(), name) for path, texts in _texts().items()
                      for text in texts for name in DOC_NAME.findall(text) if not (ROOT / "docs" / name).is_file()})
    assert not missing, f"docs named but not there: {missing}"


def test_every_section_cited_is_a_heading_of_its_doc():
    cited, broken = 0, []
    for path, texts in _texts().items():
        for text in texts:
            for name, title in SECTION.findall(text):
                doc = ROOT / "docs" / name
                if not doc.is_file():
                    continue   # test_every_doc_named_exists reports it
                cited += 1
                title = title.strip().rstrip(".").lower()
                # a citation may shorten a long heading to its start
                if not any(h.startswith(title) for h in _headings(doc)):
                    broken.append(f"{path.relative_to(ROOT).as_posix()}: docs/{name}, \"{title}\"")
    assert cited >= 20, f"only {cited} section citations found: the pattern no longer matches how docs are cited"
    assert not broken, "sections cited that are no heading of their doc:\n" + "\n".join(broken)
