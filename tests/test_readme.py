"""The README is the front door: short, starting with the two commands that work on a fresh clone, with links that
lead somewhere, and a code map that names every package folder."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_README_LINES = 350
CODE_MAP_HEADING = "## Where the code lives"
# Top-level folders that hold no project code.
NOT_CODE = {"dataset", "out", "images", "shared", "node_modules", "__pycache__"}

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def markdown_pages() -> list[Path]:
    return [README] + sorted((ROOT / "docs").glob("*.md"))


def shell_commands(markdown: str) -> list[str]:
    """The commands of the markdown's shell code blocks, in order: one per non-empty, non-comment line."""
    commands = []
    for block in re.finditer(r"^```(bash|sh|shell|console)[ \t]*\n(.*?)^```", markdown, re.S | re.M):
        for line in block.group(2).splitlines():
            command = line.split("#", 1)[0].strip()
            if command:
                commands.append(command)
    return commands


def links(markdown: str) -> list[str]:
    """The targets of the markdown's links and images, outside code."""
    prose = INLINE_CODE.sub("", FENCE.sub("", markdown))
    return LINK.findall(prose)


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for match in re.finditer(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", FENCE.sub("", page.read_text()), re.M):
        anchor = github_anchor(match.group(1))
        n, unique = 0, anchor
        while unique in found:
            n += 1
            unique = f"{anchor}-{n}"
        found.add(unique)
    return found


def broken_links(page: Path) -> list[str]:
    problems = []
    for target in links(page.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path_part, _, fragment = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not resolved.exists():
            problems.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            problems.append(f"{page.relative_to(ROOT)}: {target} (no heading with that anchor)")
    return problems


def code_folders() -> list[str]:
    """Top-level folders that hold Python code (a package or a folder of scripts)."""
    return sorted(d.name for d in ROOT.iterdir()
                  if d.is_dir() and not d.name.startswith(".") and d.name not in NOT_CODE and any(d.glob("*.py")))


def code_map(readme: str) -> str:
    assert CODE_MAP_HEADING in readme, f"README.md has no '{CODE_MAP_HEADING}' section"
    section = readme.split(CODE_MAP_HEADING, 1)[1]
    return re.split(r"^## ", section, maxsplit=1, flags=re.M)[0]


def test_readme_is_at_most_350_lines():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; move reference material to docs/"


def test_readme_first_two_commands_are_make_demo_and_make_test():
    assert shell_commands(README.read_text())[:2] == ["make demo", "make test"]


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(page: Path):
    assert broken_links(page) == []


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in links(README.read_text())}
    unlinked = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert unlinked == [], f"docs pages the README does not link: {unlinked}"


def test_code_map_names_every_code_folder():
    table = code_map(README.read_text())
    missing = [name for name in code_folders() if f"`{name}/`" not in table]
    assert missing == [], f"folders missing from the README's code map: {missing}"


# The checks themselves must be able to fail.

def test_shell_commands_skip_comments_and_other_languages():
    text = "```python\nimport x\n```\n```bash\n# set up\nmake demo   # all of it\n\nmake test\n```\n"
    assert shell_commands(text) == ["make demo", "make test"]


def test_links_outside_code_are_found_and_broken_ones_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## Some `code`: here\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md) [anchor](docs/a.md#some-code-here) [bad](docs/b.md) "
                    "[bad anchor](docs/a.md#nope) ![img](x.png) [web](https://example.com)\n"
                    "`[not](a-link.md)`\n```\n[not](either.md)\n```\n")
    assert links(page.read_text()) == ["docs/a.md", "docs/a.md#some-code-here", "docs/b.md", "docs/a.md#nope",
                                       "x.png", "https://example.com"]
    assert broken_links(page) == ["README.md: docs/b.md (no such file)",
                                  "README.md: docs/a.md#nope (no heading with that anchor)",
                                  "README.md: x.png (no such file)"]


def test_code_map_check_sees_a_folder_it_does_not_name(tmp_path, monkeypatch):
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    for name in ("model", "newpkg", "dataset", ".venv"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.py").write_text("")
    assert code_folders() == ["model", "newpkg"]
    readme = f"{CODE_MAP_HEADING}\n\n| `model/` | the network |\n\n## Next\n\n`newpkg/`\n"
    assert [n for n in code_folders() if f"`{n}/`" not in code_map(readme)] == ["newpkg"]
