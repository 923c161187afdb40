"""The package layout's rules (docs/interfaces.md): imports run downward, one home per concern."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "dinox"
# Floors, top first; a module may import its own floor and the floors below it.
# The demo drives the other commands through the CLI entry point, so the two share a floor.
FLOORS = ["cli|commands|__main__", "train", "observe", "eval", "config", "model|data|losses", "run", "errors"]


def floor_of(module: str) -> int:
    part = module.split(".")[1] if "." in module else "__init__"
    for i, names in enumerate(FLOORS):
        if part in names.split("|"):
            return i
    return len(FLOORS)  # dinox/__init__.py


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        yield ".".join(rel.parts).removesuffix(".__init__"), ast.parse(path.read_text()), path


def imported(tree) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names if node.module == "dinox"]
    return names


def test_imports_run_downward():
    upward = []
    for name, tree, _ in modules():
        here = floor_of(name)
        for target in imported(tree):
            if target.startswith("dinox.") and floor_of(target) < here:
                upward.append(f"{name} -> {target}")
    assert not upward, upward


def test_eval_never_imports_train_or_commands():
    for name, tree, _ in modules():
        if name.startswith("dinox.eval"):
            assert not [t for t in imported(tree) if t.startswith(("dinox.train", "dinox.commands"))], name


def test_only_the_command_line_sees_argparse():
    users = [name for name, tree, _ in modules() if "argparse" in imported(tree)]
    assert users and all(n == "dinox.cli" or n.startswith("dinox.commands.") for n in users), users


def test_one_definition_of_effective_rank():
    defs = [name for name, tree, _ in modules() for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef) and node.name == "effective_rank"]
    assert defs == ["dinox.eval.rank"]


def test_the_loop_and_every_class_stay_small():
    assert len((PACKAGE / "train" / "loop.py").read_text().splitlines()) < 300
    for name, tree, _ in modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno - node.lineno < 300, f"{name}.{node.name}"
