"""The layers only look down: library modules never import a command-line module (STYLE §13, issue 17)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("backbone", "envs", "policy")
LAYER = {"backbone": 0, "envs": 1, "policy": 2}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_command(source: str) -> bool:
    """A module with a ``__main__`` block or an argparse parser is a command line, a leaf nothing may import (one
    that only offers argparse types, ``backbone.option_checks``, is a library)."""
    return "__main__" in source or "ArgumentParser(" in source


def _imports(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


MODULES = {_module_name(p): p.read_text() for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}
COMMANDS = {name for name, source in MODULES.items() if _is_command(source)}


def test_the_commands_are_found() -> None:
    """Guards the test below: it must know the command modules, or it would check nothing."""
    assert {"backbone.train", "backbone.evaluate", "backbone.convert_official", "policy.cli", "policy.ablation",
            "policy.infer"} <= COMMANDS  # fmt: skip


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_imports_a_command_line_module(name: str) -> None:
    imported = _imports(MODULES[name]) & COMMANDS
    assert not imported, f"{name} imports command-line module(s) {sorted(imported)}; move the logic into a library"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_layers_only_look_down(name: str) -> None:
    """backbone/ imports neither envs/ nor policy/; envs/ does not import policy/."""
    own = LAYER[name.split(".")[0]]
    above = {m for m in _imports(MODULES[name]) if LAYER.get(m.split(".")[0], -1) > own}
    assert not above, f"{name} imports {sorted(above)} from a higher layer"
