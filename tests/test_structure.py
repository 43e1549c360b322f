"""The layout the design asks for, read from the source: imports go one way (no circle, the core
never imports the trainer or the toolkit), and the trainer's functions stay short."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pgpo", "sde", "proofs_checks")
CORE = ("pgpo.multiplier", "pgpo.information", "pgpo.distill", "pgpo.optim", "pgpo.reduction")
NOT_FROM_CORE = ("pgpo.train", "pgpo.demo", "pgpo.cli", "pgpo.integrations", "sde", "proofs_checks")
MAX_LINES = 100


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, wherever in the file (lazy imports count)."""
    names = modules()
    graph = {}
    for name, path in names.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                candidates = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            # A package's own __init__ is not an edge from its modules (Python runs it anyway).
            deps |= {c for c in candidates if c in names and not name.startswith(c + ".")}
        graph[name] = deps - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                found.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    # engines.make_engine imports the vLLM engine lazily, inside the function.
    assert "pgpo.train.rollout.vllm" in graph["pgpo.train.rollout.engines"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_circle_in_the_packages():
    assert cycles(import_graph()) == []


def test_the_core_imports_neither_the_trainer_nor_the_toolkit():
    graph = import_graph()
    bad = [(m, d) for m in CORE for d in graph[m] if d.startswith(NOT_FROM_CORE)]
    assert bad == []


def test_the_rollout_interface_knows_no_engine():
    assert import_graph()["pgpo.train.rollout"] == set()


def test_every_engine_has_what_the_rollout_interface_names():
    """The members of the RolloutEngine Protocol (the loop uses no other) are defined by each
    engine class, methods on the class and attributes in its __init__."""
    from pgpo.train.rollout import RolloutEngine

    names = {n for n in vars(RolloutEngine) if not n.startswith("_")}
    names |= set(RolloutEngine.__annotations__)
    assert names == {"generate", "sync_weights", "close", "sleep_freed_gib"}
    for module, cls in (("hf", "HFRolloutEngine"), ("vllm", "VLLMRolloutEngine")):
        tree = ast.parse((ROOT / "pgpo" / "train" / "rollout" / f"{module}.py").read_text())
        (node,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls]
        methods = {f.name for f in node.body if isinstance(f, ast.FunctionDef)}
        init = next(f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
        attributes = {t.attr for a in ast.walk(init) if isinstance(a, ast.AnnAssign | ast.Assign)
                      for t in (a.targets if isinstance(a, ast.Assign) else [a.target])
                      if isinstance(t, ast.Attribute)}  # fmt: skip
        assert names <= methods | attributes, (cls, names - methods - attributes)


def test_importing_the_multiplier_imports_neither_torch_nor_transformers():
    code = (
        "import sys, pgpo.multiplier; print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.split() == ["False", "False"], done.stderr


def test_no_function_in_the_trainer_is_over_100_lines():
    long = []
    for path in (ROOT / "pgpo" / "train").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length})")
    assert long == []


def _is_slow(decorator: ast.expr) -> bool:
    return ast.unparse(decorator) == "pytest.mark.slow"


def test_the_quick_tier_covers_every_test_module():
    """``-m "not slow"`` leaves at least one test in every test module, so the quick tier touches
    every part of the project; a whole module marked slow (``pytestmark``) is refused."""
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets
            ):
                assert "slow" not in ast.unparse(node.value), f"{path.name}: a whole module slow"
        tests = [
            node
            for node in tree.body
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
        ]
        quick = [t for t in tests if not any(_is_slow(d) for d in t.decorator_list)]
        assert quick, f"{path.name}: every test is marked slow"


def test_every_json_file_is_written_through_json_text():
    """JSON goes out through ``pgpo.outputs.json_text`` only, which writes NaN and infinities
    as null: Python's ``json.dumps`` alone writes ``NaN``/``Infinity``, which is not JSON."""
    offenders = []
    for path in [*(ROOT / p for p in PACKAGES), ROOT / "benchmarks"]:
        for file in path.rglob("*.py") if path.is_dir() else []:
            if file.name == "outputs.py":
                continue
            for node in ast.walk(ast.parse(file.read_text())):
                if isinstance(node, ast.Call) and ast.unparse(node.func) in (
                    "json.dumps",
                    "json.dump",
                ):
                    offenders.append(f"{file.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders
