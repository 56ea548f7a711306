"""The README is a five-minute read that links every docs/ page; links resolve; the demo
table is written into docs/demo.md by scripts/readme_demo.py, never by hand."""

from __future__ import annotations

import importlib.util
import re

import pandas as pd

from tests.helpers import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
PAGES = sorted((REPO / "docs").glob("*.md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_readme_is_short_and_names_the_paper():
    assert len(README.splitlines()) <= 200
    assert "Deep Hierarchical Learning with Nested Subspace Networks" in README
    assert "https://arxiv.org/abs/2509.17874" in README and "Rauba" in README
    assert re.search(r"^pip install ", README, re.M)
    setup = README.split("## Set-up", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    assert [line.split("#")[0].strip() for line in setup.strip().splitlines()] == [
        "make demo", "make test"]


def test_readme_links_every_docs_page():
    linked = {m for m in LINK.findall(README)}
    missing = [p.name for p in PAGES if f"docs/{p.name}" not in linked]
    assert not missing, f"add one line per page to README.md's Documentation list: {missing}"


def test_every_relative_link_resolves():
    for page in [REPO / "README.md", *PAGES]:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            assert path.exists(), f"{page.name} links to missing {target}"


def test_demo_table_is_written_into_docs_demo(tmp_path):
    spec = importlib.util.spec_from_file_location("readme_demo", REPO / "scripts/readme_demo.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    root, project = tmp_path / "repo", tmp_path / "demo-out"
    (root / "docs").mkdir(parents=True)
    page = root / "docs" / "demo.md"
    page.write_text(f"intro\n{script.START}\nold table\n{script.END}\noutro\n")
    (project / "profile").mkdir(parents=True)
    (project / "frontier").mkdir()
    (project / "frontier" / "frontier.png").write_bytes(b"png")
    pd.DataFrame({"variant": ["nsn", "dense"], "flops_fraction": [0.5, 1.0],
                  "accuracy": [0.625, 0.75]}).to_csv(project / "profile" / "profile.csv")
    script.main(project, root=root)
    text = page.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{script.END}\noutro\n")
    assert "old table" not in text and "| nsn | 0.500 | 0.625 |" in text
    assert "![demo frontier](demo-frontier.png)" in text
    assert (root / "docs" / "demo-frontier.png").read_bytes() == b"png"
    shipped = (REPO / "docs" / "demo.md").read_text(encoding="utf-8")
    assert script.START in shipped and script.END in shipped


def test_reliability_table_names_tests_that_exist_one_for_one():
    """docs/reliability.md's table names each test that proves a row, and every test of
    the issue-12 file (tests/project/test_trust.py) is named in some row."""
    page = (REPO / "docs" / "reliability.md").read_text(encoding="utf-8")
    rows = [line for line in page.splitlines() if line.startswith("| **")]
    assert len(rows) >= 8
    named = set()
    for row in rows:
        cited = re.findall(r"`(tests/[\w/]+\.py)::(test_\w+)`", row.rsplit(" | ", 1)[-1])
        assert cited, f"a row names no test: {row[:60]}"
        for path, name in cited:
            assert re.search(rf"^def {name}\(", (REPO / path).read_text(encoding="utf-8"),
                             re.M), f"{path}::{name} does not exist"
            named.add((path, name))
    trust = "tests/project/test_trust.py"
    defined = re.findall(r"^def (test_\w+)\(", (REPO / trust).read_text(encoding="utf-8"), re.M)
    assert [t for t in defined if (trust, t) not in named] == []
