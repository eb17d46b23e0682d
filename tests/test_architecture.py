"""The package's import graph, read from the source with `ast`: no cycles between packages, and
serving and inference never reach into training (docs/ARCHITECTURE.md draws the arrows)."""

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).parents[1] / "picochat"


def package_of(module: str) -> str:
    """picochat.infer.engine -> infer; picochat.plan -> plan; picochat -> (the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "(root)"


def import_graph() -> dict[str, set[str]]:
    """package -> the picochat packages it imports (anywhere in its files, functions included)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in ROOT.rglob("*.py"):
        module = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
        source = package_of(module)
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names] if node.module == "picochat" \
                    else [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name.startswith("picochat."):
                    target = package_of(name)
                    if target != source:
                        graph[source].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every package that can reach itself, with one path that shows it."""
    found = []
    for start in sorted(graph):
        stack = [(start, [start])]
        seen = set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    found.append(path + [start])
                    stack = []
                    break
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    return found


def test_the_graph_is_read_from_the_source():
    graph = import_graph()
    assert "model" in graph["infer"] and "infer" in graph["serve"]  # the check sees real imports


def test_no_package_import_cycles():
    assert cycles(import_graph()) == []


def test_serving_and_inference_never_import_training():
    graph = import_graph()
    for package in ("infer", "serve", "model", "tokenizer", "checkpoint"):
        assert "train" not in graph.get(package, set()), f"picochat.{package} imports picochat.train"
    assert "eval" not in graph.get("tasks", set()), "picochat.tasks imports picochat.eval"


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})[0] == ["a", "b", "c", "a"]
