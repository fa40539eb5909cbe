"""The layering of README "Architecture": contract → backends → loop → tools. Every import
statement of every first-party module (module-level or inside a function) is read from the
source, so an import hidden in a function body is seen too; the failure names the module,
the line and the import. Also: no import cycle among first-party modules."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"contract", "oracle_torch", "jax_impl", "loop", "parity", "scripts", "tests"}

# package -> first-party packages its modules may import
ALLOWED = {
    "contract": {"contract"},
    "oracle_torch": {"contract", "oracle_torch"},
    "jax_impl": {"contract", "jax_impl"},
    "loop": {"contract", "loop"},
}
# the documented exceptions: the two CLI entry points bind loop/cli.py to their backend, and
# loop/backends.py names the backends (lazily, inside make_backend)
EXCEPTIONS = {
    "oracle_torch/cli.py": {"loop"},
    "jax_impl/cli.py": {"loop"},
    "loop/backends.py": {"oracle_torch", "jax_impl"},
}


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def first_party_imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, imported module, at module level) for every first-party import of a file."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            if n.split(".")[0] in FIRST_PARTY:
                out.append((node.lineno, n, id(node) in top))
    return out


def sources() -> list[Path]:
    return sorted(p for pkg in FIRST_PARTY for p in (REPO / pkg).rglob("*.py") if "__pycache__" not in p.parts)


def test_every_layer_imports_only_what_it_may():
    bad = []
    checked = 0
    for path in sources():
        rel = path.relative_to(REPO).as_posix()
        pkg = rel.split("/")[0]
        if pkg not in ALLOWED:
            continue
        allowed = ALLOWED[pkg] | EXCEPTIONS.get(rel, set())
        for line, name, _ in first_party_imports(path):
            checked += 1
            if name.split(".")[0] not in allowed:
                bad.append(f"{rel}:{line} imports {name} (layer {pkg} may import {sorted(allowed)})")
    assert checked > 50  # the walk really reads imports (no vacuous pass)
    assert not bad, "\n".join(bad)


def test_loop_names_the_backends_only_lazily():
    # loop/backends.py imports a backend inside make_backend only: importing the loop never
    # imports torch or jax
    lazy = [(line, n) for line, n, top in first_party_imports(REPO / "loop" / "backends.py")
            if n.split(".")[0] in {"oracle_torch", "jax_impl"}]
    assert lazy and all(not top for _, n, top in first_party_imports(REPO / "loop" / "backends.py")
                        if n.split(".")[0] in {"oracle_torch", "jax_impl"})


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in sources()}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for m, path in modules.items():
        for _, name, _ in first_party_imports(path):
            # `from a.b import c` names a.b.c, which is a module or a name in a.b
            target = name if name in modules else name.rsplit(".", 1)[0]
            if target in modules and target != m:
                graph[m].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycle_among_first_party_modules():
    graph = import_graph()
    assert sum(len(v) for v in graph.values()) > 50
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_sees_a_cycle():
    # the checker has teeth: a two-module cycle hidden in function bodies is found
    assert find_cycle({"a": {"b"}, "b": {"a"}, "c": set()}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
