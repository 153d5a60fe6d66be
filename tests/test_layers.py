"""Layers that point one way: imports at module top (function-level ones only in CLI entry points), no
private names across modules, public names in ``__all__``, and a config layer that loads no heavy library."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import bptt_harness.study

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "bptt_harness"
# The command-line entry points: they import a command's stack only when that command runs, so that
# `bptt-harness --help` and `bptt-harness report` do not load torch.
CLI_ENTRY_POINTS = {"cli.py", "study_cli.py", "trial_cli.py", "diagnose_cli.py", "report/cli.py", "__main__.py"}


def _modules() -> list[tuple[str, ast.Module]]:
    return [(p.relative_to(PACKAGE).as_posix(), ast.parse(p.read_text(encoding="utf-8")))
            for p in sorted(PACKAGE.rglob("*.py"))]


def _function_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST, inside: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if inside and isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            visit(child, inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(tree, False)
    return found


def _own(node: ast.Import | ast.ImportFrom) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.level > 0 or (node.module or "").startswith("bptt_harness")
    return any(a.name.startswith("bptt_harness") for a in node.names)


def test_the_package_imports_its_own_modules_at_module_top_outside_the_cli() -> None:
    inside = [f"{name}:{node.lineno}" for name, tree in _modules() if name not in CLI_ENTRY_POINTS
              for node in _function_level_imports(tree) if _own(node)]
    assert inside == [], "import these at module top (a function-level import hides a layer): " + ", ".join(inside)
    assert all((PACKAGE / name).is_file() for name in CLI_ENTRY_POINTS)


def test_no_module_imports_another_modules_private_names() -> None:
    private = [f"{name}:{node.lineno} {a.name}" for name, tree in _modules() for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom) and _own(node) for a in node.names
               if a.name.startswith("_") and not a.name.endswith("__")]   # a dunder (__version__) is public
    assert private == []


def test_the_study_package_exports_public_names_only() -> None:
    names = bptt_harness.study.__all__
    assert names and not [n for n in names if n.startswith("_")]
    assert all(hasattr(bptt_harness.study, n) for n in names)


def test_importing_the_config_loads_neither_torch_nor_optuna_nor_pandas() -> None:
    code = "import sys, bptt_harness.config; print(sorted(m for m in ('torch', 'optuna', 'pandas') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_the_counter_finds_a_function_level_import() -> None:
    tree = ast.parse("import os\n\ndef f():\n    from bptt_harness import spec\n    import json\n")
    assert [(type(n).__name__, _own(n)) for n in _function_level_imports(tree)] == [("ImportFrom", True),
                                                                                    ("Import", False)]
