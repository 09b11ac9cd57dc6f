"""The engines' seams: one protocol that every engine implements in full, no import cycles between the loop, the
checkpoint manager and the engines (the loop imports them, never the reverse), and the protocol's methods are the
only ones the loop calls."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from experiments.engines import Engine

ROOT = Path(__file__).resolve().parents[2]
ENGINES = ["single", "ddp", "fsdp", "deepspeed"]
PROTOCOL = [name for name, _ in inspect.getmembers(Engine, inspect.isfunction) if not name.startswith("_")]


def _imports(path: Path) -> set[str]:
    """The project modules a file imports at run time (at any depth in the file: lazy imports count too; imports
    for type checkers only, under `if TYPE_CHECKING:`, do not)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
                   for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.split(".")[0] in ("experiments", "moe", "routing", "upcycle")}


def _module_graph() -> dict[str, set[str]]:
    graph = {}
    for path in [*(ROOT / "experiments").rglob("*.py"), *(ROOT / "moe").rglob("*.py"), *(ROOT / "routing").rglob("*.py")]:
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        graph[name] = _imports(path)
    return graph


def test_protocol_is_narrow():
    assert PROTOCOL == sorted(["wrap", "forward", "train_micro", "step", "state_to_save", "load_state", "close"])


@pytest.mark.parametrize("kind", ENGINES)
def test_every_engine_implements_the_whole_protocol_with_its_signatures(kind):
    import importlib

    module = importlib.import_module(f"experiments.engines.{kind}")
    cls = next(c for _, c in inspect.getmembers(module, inspect.isclass)
               if c.__module__ == module.__name__ and c.__name__.endswith("Engine"))
    for name in PROTOCOL:
        method = getattr(cls, name, None)
        assert callable(method), f"{cls.__name__} lacks {name}"
        want = [p for p in inspect.signature(getattr(Engine, name)).parameters]
        got = [p for p in inspect.signature(method).parameters]
        assert got[:len(want)] == want, (cls.__name__, name, got, want)
    assert isinstance(getattr(cls, "skips_non_finite"), bool)
    assert cls.__mro__[1] is object, f"{cls.__name__} is a sibling, not an override of another engine"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A chain of imports that comes back to where it started, or None (depth-first search for a back edge).
    `from pkg.mod import name` where name is not a module counts as importing pkg.mod; a package importing its
    own submodules is not a cycle of concepts."""
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                nxt = nxt.rsplit(".", 1)[0]
                if nxt not in graph:
                    continue
            if state.get(nxt) == 1:
                if nxt != node and not nxt.startswith(node + ".") and not node.startswith(nxt + "."):
                    return path + [nxt]
            elif nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            found = visit(name, [name])
            if found:
                return found
    return None


def test_the_cycle_check_sees_a_lazy_cycle_and_not_a_typing_one(tmp_path):
    """What distributed.py, deepspeed_engine.py and trainer.py had: a lazy import back is a cycle; an import for
    type checkers only is not."""
    (tmp_path / "a.py").write_text("from experiments.b import f\n")
    (tmp_path / "b.py").write_text("def f():\n    from experiments.a import x\n")
    (tmp_path / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from experiments.a import x\n")
    graph = {f"experiments.{n}": _imports(tmp_path / f"{n}.py") for n in "abc"}
    assert graph["experiments.c"] == set()
    assert find_cycle(graph) == ["experiments.a", "experiments.b", "experiments.a"]
    assert find_cycle({k: v for k, v in graph.items() if k != "experiments.b"}) is None


def test_no_import_cycles_in_the_application():
    graph = _module_graph()
    low = {"experiments.checkpoints", *(f"experiments.engines.{k}" for k in ENGINES), "experiments.engines",
           "experiments.engines.ranks", "experiments.engines.full_size"}
    for name in low:
        assert "experiments.trainer" not in graph[name], f"{name} imports the training loop"
    for kind in ENGINES:
        assert "experiments.checkpoints" not in graph[f"experiments.engines.{kind}"], kind
    # no cycle among the application's modules (moe/ and routing/ are below it)
    app = {k: {m for m in v if m.startswith("experiments")} for k, v in graph.items() if k.startswith("experiments")}
    assert find_cycle(app) is None, f"import cycle: {' -> '.join(find_cycle(app))}"
