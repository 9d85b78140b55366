"""The package's layers: the workflow calls the command line, the command line calls the stages, the
stages use the foundations. No stage imports the command line or the plan; no foundation imports a
stage. Imports inside functions count too."""

from __future__ import annotations

import ast

import pytest
from conftest import REPO

PACKAGE = REPO / "maskdistill"
FOUNDATIONS = {"backbone", "config", "datasets", "distributed", "ground_truth", "images", "metrics", "paper",
               "report", "settings", "storage", "training", "weights_cache"}
WORKFLOW = {"cli", "plan"}
STAGES = {p.stem for p in PACKAGE.glob("*.py")} - FOUNDATIONS - WORKFLOW - {"__init__"}


def imported_modules(module: str) -> set[str]:
    """The ``maskdistill`` modules that ``module`` imports, anywhere in its file."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("maskdistill."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("maskdistill.")}
    return names


def test_every_module_is_in_a_layer():
    assert STAGES >= {"mining", "clustering", "detector", "pseudo_labels", "segmentation", "evaluation"}
    assert all((PACKAGE / f"{m}.py").is_file() for m in FOUNDATIONS | WORKFLOW)


@pytest.mark.parametrize("module", sorted(FOUNDATIONS))
def test_a_foundation_imports_foundations_only(module):
    assert imported_modules(module) <= FOUNDATIONS, imported_modules(module) - FOUNDATIONS


@pytest.mark.parametrize("module", sorted(STAGES))
def test_a_stage_never_imports_the_command_line_or_the_plan(module):
    assert not imported_modules(module) & WORKFLOW


def test_only_the_workflow_imports_the_plan_and_nothing_imports_the_command_line():
    for module in FOUNDATIONS | STAGES | {"plan"}:
        assert "cli" not in imported_modules(module), module
    assert "plan" not in imported_modules("cli")
