"""The layers point down only: `server/` and `client/` are peers over `shared/`, and no module
imports itself through others. Read with plain `ast` over the source, so every import counts:
module level, inside functions, and under `if TYPE_CHECKING:`."""

from __future__ import annotations

import ast
import subprocess
import sys

from helpers import ROOT

PACKAGES = ("server", "client", "shared")


def modules() -> dict[str, ast.Module]:
    """Every module of the three packages by dotted name (a package by its own name)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = ast.parse(path.read_text(), str(path))
    return out


def imported(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The modules of `known` that `name` imports: `from a import b` names a.b when that is a
    module, else a; `import a.b.c` names the longest known prefix."""
    out = set()
    package = name if any(k.startswith(name + ".") for k in known) else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    trees = modules()
    known = set(trees) | {m for m in ("server", "client", "shared")}
    return {name: imported(name, tree, known) for name, tree in trees.items()}


def layer(module: str) -> str:
    return module.split(".", 1)[0]


def test_the_walker_sees_every_kind_of_import():
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from server.fleet import Fleet\n"
                     "def f():\n    import client.tasks\nfrom shared import codec\n")
    known = {"server", "server.fleet", "client", "client.tasks", "shared", "shared.codec"}
    assert imported("shared.x", tree, known) == {"server.fleet", "client.tasks", "shared.codec"}


def test_shared_imports_neither_server_nor_client():
    bad = {(m, t) for m, targets in graph().items() if layer(m) == "shared" for t in targets if layer(t) != "shared"}
    assert not bad, f"shared/ imports upwards: {sorted(bad)}"


def test_server_and_client_do_not_import_each_other():
    bad = {(m, t) for m, targets in graph().items() for t in targets
           if {layer(m), layer(t)} == {"server", "client"}}
    assert not bad, f"server/ and client/ import each other: {sorted(bad)}"


def test_no_module_imports_itself_through_others():
    g = graph()
    cycles = [cycle for cycle in map(lambda m: find_cycle(g, m), sorted(g)) if cycle]
    assert not cycles, f"circular imports: {cycles[0]}"


def find_cycle(g: dict[str, set[str]], start: str) -> list[str] | None:
    """A path start -> ... -> start in `g`, or None (depth-first, each module visited once)."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in sorted(g.get(node, ())):
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return None


def test_the_client_side_loads_no_server_module_even_dynamically():
    """Imports by name at run time (`importlib`, the method registry) are invisible to `ast`: build a
    config and load every method's client half as the ClientApp does, then look at what got loaded."""
    code = ("import sys; import client.app; from shared.config import load_config; from shared.methods import METHODS, load; "
            "c = load_config(None); [load(m).client for m in METHODS]; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'server'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
