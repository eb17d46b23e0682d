"""The package's import graph, read from the source with `ast`: no cycles between packages,
serving and inference never reach into training (docs/ARCHITECTURE.md draws the arrows), and an
import sits inside a function only with a comment saying why."""

import ast
import sys
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


def deferred_imports_without_a_reason() -> list[str]:
    """Imports inside functions with no comment on their line, the line above, or the first line of the
    run of import lines they belong to: each deferred import must say why it is deferred."""
    bare = []
    for path in sorted(ROOT.rglob("*.py")):
        lines = path.read_text().splitlines()
        for fn in ast.walk(ast.parse("\n".join(lines), filename=str(path))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                first = node.lineno - 1
                while first > 0 and lines[first - 1].strip().startswith(("import ", "from ")):
                    first -= 1  # the start of this run of import lines
                said = [lines[node.lineno - 1], lines[first], lines[first - 1] if first else ""]
                if not any("#" in line for line in said):
                    bare.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: {ast.unparse(node)}")
    return bare


def test_imports_sit_at_the_top_unless_a_comment_says_why_not():
    assert deferred_imports_without_a_reason() == []


def test_the_check_finds_a_deferred_import_without_a_reason(tmp_path, monkeypatch):
    pkg = tmp_path / "picochat"
    pkg.mkdir()
    (pkg / "a.py").write_text("def f():\n    import json\n\n    return json\n\n\ndef g():\n"
                              "    import wandb  # optional\n    import yaml\n    return wandb, yaml\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", pkg)
    assert deferred_imports_without_a_reason() == ["picochat/a.py:2: import json"]
