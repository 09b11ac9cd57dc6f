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
    """The project modules a file imports (at any depth in the file: lazy imports count too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
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


def test_no_import_cycles_in_the_application():
    graph = _module_graph()
    low = {"experiments.checkpoints", *(f"experiments.engines.{k}" for k in ENGINES), "experiments.engines",
           "experiments.engines.ranks", "experiments.engines.full_size"}
    for name in low:
        assert "experiments.trainer" not in graph[name], f"{name} imports the training loop"
    for kind in ENGINES:
        assert "experiments.checkpoints" not in graph[f"experiments.engines.{kind}"], kind
    # no cycle among the application's modules (depth-first search for a back edge; moe/ and routing/ are below)
    graph = {k: {m for m in v if m.startswith("experiments")} for k, v in graph.items() if k.startswith("experiments")}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                nxt = nxt.rsplit(".", 1)[0]  # `from pkg.mod import name` where name is a function
                if nxt not in graph:
                    continue
            if state.get(nxt) == 1 and nxt != node and not nxt.startswith(node + "."):
                # a package's __init__ importing its own submodules is not a cycle of concepts
                if not node.startswith(nxt + "."):
                    raise AssertionError(f"import cycle: {' -> '.join(path + [nxt])}")
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
