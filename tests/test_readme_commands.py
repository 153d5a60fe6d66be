"""README corrections (issue 14, item 8): commands a reader copies run from the venv, the Makefile names
only variables it has, the results README points at the column docs, the compare example matches the
published layout."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUBCOMMANDS = "sweep|worker|report|compare|trial|doctor|profile|corpus|diagnose"


def commands(markdown: str) -> list[str]:
    """Command lines of fenced blocks (comments cut off) and inline code spans."""
    out, fenced = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif fenced:
            out.append(line.split(" #")[0])
    out += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", markdown, flags=re.S))
    return out


def test_readme_commands_use_the_venv() -> None:
    bare = re.compile(rf"(?<![\w/.-])bptt-harness ({SUBCOMMANDS}) \S")
    lines = commands((REPO / "README.md").read_text())
    assert any(".venv/bin/bptt-harness sweep" in c for c in lines)
    assert [c for c in lines if bare.search(c)] == []


def test_the_makefile_names_only_its_own_variables() -> None:
    text = (REPO / "Makefile").read_text()
    defined = set(re.findall(r"^([A-Z_]+)\s*[?:]?=", text, flags=re.M))
    named = set(re.findall(r"\b(TORCH_[A-Z_]+)\b", text))
    assert named <= defined, named - defined
    readme = (REPO / "README.md").read_text()
    assert set(re.findall(r"\b(TORCH_[A-Z_]+)=", readme)) <= defined


def test_results_readme_points_at_the_column_docs() -> None:
    text = (REPO / "results" / "README.md").read_text()
    assert "top-level README" not in text
    for target in re.findall(r"\]\((\.\./[^)#]+)", text):
        assert (REPO / "results" / target).resolve().is_file(), target
    assert "bptt_harness/report/README.md" in text


def test_compare_examples_match_the_published_layout() -> None:
    studies = {p.stem for p in (REPO / "studies").glob("*.toml")}
    for doc in ("README.md", "bptt_harness/report/README.md"):
        lines = [c for c in commands((REPO / doc).read_text()) if re.search(r"bptt-harness compare results/", c)]
        assert lines, doc
        for line in lines:
            paths = re.findall(r"results/published/\S+", line)
            assert len(paths) >= 2, line
            for p in paths:  # results/published/<machine>/<study>
                parts = p.split("/")
                assert len(parts) == 4 and parts[3] in studies, p
