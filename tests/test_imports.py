"""The package's import graph, read from the source (ast): no cycles, even through imports inside
functions, and the heavy libraries imported only by the modules that use them."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mmsearch"
HEAVY = {  # library -> the only modules that may import it (always inside functions, or lazily imported)
    "torch": {"mmsearch.backends.torch_backend", "mmsearch.export", "mmsearch.models", "mmsearch.train"},
    "open_clip": {"mmsearch.backends.torch_backend", "mmsearch.export", "mmsearch.models", "mmsearch.train"},
    "torchvision": {"mmsearch.export", "mmsearch.train"},
    "transformers": {"mmsearch.models", "mmsearch.train"},
    "faiss": {"mmsearch.index"},
    "onnxruntime": {"mmsearch.backends.onnx_backend", "mmsearch.quantize"},
    "ray": {"mmsearch.scale"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(mmsearch modules, top-level external packages) that module ``name`` imports anywhere."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    internal, external = set(), set()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                   for n in ast.walk(block)}  # annotations only: never imported at run time
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            if t in modules:
                internal.add(t)
            elif not t.startswith("mmsearch"):
                external.add(t.split(".")[0])
    internal.discard(name)
    return internal, external


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _graph():
    modules = _modules()
    facts = {m: _imports(m, p, modules) for m, p in modules.items()}
    # a package's __init__ importing its own submodules is how packages work, not a cycle
    graph = {m: {d for d in deps if not (d.startswith(m + ".") and modules[m].name == "__init__.py")}
             for m, (deps, _) in facts.items()}
    return graph, {m: ext for m, (_, ext) in facts.items()}


def test_the_package_has_no_import_cycles():
    graph, _ = _graph()
    assert "mmsearch.indexing" in graph and graph["mmsearch.indexing"]  # the graph was read
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_heavy_libraries_are_imported_only_where_they_are_used():
    _, external = _graph()
    for lib, allowed in HEAVY.items():
        users = {m for m, ext in external.items() if lib in ext}
        outside = {m for m in users if not any(m == a or m.startswith(a + ".") for a in allowed)}
        assert not outside, f"{lib} imported by {sorted(outside)}"
