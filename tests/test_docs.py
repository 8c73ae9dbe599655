"""The documentation: the site builds with ``mkdocs build --strict`` (every link and anchor between
pages resolves), every page under docs/ is in the nav, the code map names every module, the
README's relative links resolve, and its real-use example is the tested recipe of docs/real-use.md."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _nav_pages(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [p for item in nav for p in _nav_pages(item)]
    if isinstance(nav, dict):
        return [p for v in nav.values() for p in _nav_pages(v)]
    return []


def test_mkdocs_build_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    p = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                        "-d", str(tmp_path / "site")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert (tmp_path / "site" / "index.html").is_file()


def test_every_page_is_in_the_nav():
    nav = _nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"])
    pages = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    assert sorted(set(pages) - set(nav)) == [], "pages missing from mkdocs.yml's nav"
    assert sorted(set(nav) - set(pages)) == [], "nav entries without a page"


def test_the_code_map_names_every_module():
    text = (DOCS / "code-map.md").read_text(encoding="utf-8")
    missing = []
    for package in ("lm4lv_core", "lm4lv_cli"):
        for f in sorted((ROOT / package).rglob("*.py")):
            if f.name == "__init__.py":
                continue
            dotted = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            if f.name not in text and dotted not in text:
                missing.append(f.relative_to(ROOT).as_posix())
    assert missing == [], f"docs/code-map.md does not name {missing}"


def test_readme_relative_links_resolve():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # links in code blocks are not links
    anchors = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.*)$", text, re.M)}
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links, "the README links to its topic pages"
    bad = []
    for link in links:
        if re.match(r"[a-z]+:", link):  # https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        if path and not (ROOT / path).exists():
            bad.append(link)
        elif not path and anchor not in anchors:
            bad.append(link)
    assert bad == []


def test_readme_example_is_the_documented_recipe():
    """Each command of the README's real-use example appears, as written, in docs/real-use.md (whose
    make-data and generate commands tests/test_fail_loudly.py runs)."""
    def commands(text: str) -> list[str]:
        blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
        lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
        return [" ".join(line.split()) for line in lines if line.strip().startswith("lm4lv ")]

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    example = commands(readme[readme.index("## Real use"):])
    recipe = commands((DOCS / "real-use.md").read_text(encoding="utf-8"))
    assert example and [c for c in example if c not in recipe] == []
