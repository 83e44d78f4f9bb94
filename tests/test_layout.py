"""The package layout: the parts of gkd import one way, nothing imports itself back at import time, and
modules and functions stay readable. Reads the sources with ``ast``; imports nothing of gkd."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "gkd"

# Lowest first: a part may import itself and the parts before it, never one after it.
ORDER = (
    "_lazy",  # names a package resolves on first use (PEP 562)
    "config",  # the run configuration: schema, loading, checks
    "kernels",  # the loss kernels (Triton and torch)
    "weights",  # the weight channel: flat buffers, wire, membership, sender and receiver
    "data",  # prompts, datasets, the hub, tokenizers
    "services",  # transport, the service layer the teacher and rollout share, input checks
    "rollout",  # the generators
    "teacher",  # the teacher service (its hf engine reuses the rollout's decoding)
    "metrics",  # metrics, W&B, the timeline
    "trainer",  # the recipe, its step, checkpoints, validation, LoRA
    "launch",  # one node's launcher: placement, preflight, several nodes
    "evaluate",  # gkd eval
    "demo",  # gkd demo
    "api",  # gkd.distill
    "gkd",  # the package's own namespace (lazy names)
    "cli",  # the gkd command
    "train",  # deprecated: the old rank entry point (-m gkd.train), runs gkd.trainer; to be removed
)
# the modules of gkd/ itself; everything else belongs to a part
TOP_LEVEL = {"__init__", "_lazy", "api", "cli", "evaluate", "train"}
NATIVE = {"gkd._C"}  # the compiled extension: imported by gkd.weights.native only
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 100
LONG_FUNCTIONS = {("gkd/kernels/topk_triton.py", "_topk_distill_fwd_kernel")}  # one Triton kernel body


@dataclass(frozen=True)
class Edge:
    source: str  # the importing module
    target: str  # the imported module (a package's __init__ is the package's name)
    line: int
    top: bool  # runs when the module is imported (not inside a function)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module ``name`` refers to: itself, or the longest module prefix (a name inside a module)."""
    while name:
        if name in modules or name in NATIVE:
            return name
        name = name.rpartition(".")[0]
    return None


def _edges(modules: dict[str, Path]) -> list[Edge]:
    edges = []
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        inside = _function_nodes(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names]  # a submodule, or a name in ``base``
            else:
                continue
            for name in names:
                if not name.startswith("gkd"):
                    continue
                target = _resolve(name, modules)
                if target is not None and target != mod:
                    edges.append(Edge(mod, target, node.lineno, id(node) not in inside))
    return edges


def _function_nodes(tree: ast.Module) -> set[int]:
    inside = set()
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            inside |= {id(n) for n in ast.walk(fn) if n is not fn}
    return inside


def part_of(module: str) -> str:
    parts = module.split(".")
    return "gkd" if len(parts) == 1 else parts[1]


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return modules, _edges(modules)


def test_every_module_belongs_to_a_part(graph):
    modules, _ = graph
    stray = sorted(m for m in modules if part_of(m) not in ORDER)
    assert not stray, f"modules outside the parts of ORDER: {stray}"
    top = sorted(p.stem for p in PKG.glob("*.py"))
    assert set(top) <= TOP_LEVEL, f"gkd/ holds modules that belong in a part: {sorted(set(top) - TOP_LEVEL)}"


def test_parts_import_downward_only(graph):
    _, edges = graph
    rank = {p: i for i, p in enumerate(ORDER)}
    upward = [
        f"{e.source}:{e.line} imports {e.target} ({part_of(e.source)} may not import {part_of(e.target)})"
        for e in edges
        if e.target not in NATIVE and rank[part_of(e.target)] > rank[part_of(e.source)]
    ]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_only_the_bridge_imports_the_extension(graph):
    _, edges = graph
    assert {e.source for e in edges if e.target in NATIVE} == {"gkd.weights.native"}


def _import_time_graph(modules: dict[str, Path], edges: list[Edge]) -> dict[str, set[str]]:
    """What importing each module runs: its module-level imports, and each imported module's packages
    (importing ``gkd.a.b`` runs ``gkd/a/__init__.py`` first)."""
    out: dict[str, set[str]] = {m: set() for m in modules}
    for e in edges:
        if not e.top or e.target in NATIVE:
            continue
        target = e.target
        while target and target != e.source:
            if target in modules and not e.source.startswith(target + "."):
                out[e.source].add(target)
            target = target.rpartition(".")[0]
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_itself_back_at_import_time(graph):
    """A cycle of module-level imports makes import order matter (a half-initialised module); an import
    inside a function, run later, is how one part defers a heavy or later-defined name."""
    modules, edges = graph
    cycles = _cycles(_import_time_graph(modules, edges))
    assert not cycles, f"import-time cycles: {cycles}"


def test_the_checks_see_a_planted_upward_import_and_cycle(tmp_path):
    """The two checks above fail on the faults they look for (a made-up pair of modules)."""
    modules = {"gkd.config.a": tmp_path / "a.py", "gkd.launch.b": tmp_path / "b.py"}
    edges = [Edge("gkd.config.a", "gkd.launch.b", 1, True), Edge("gkd.launch.b", "gkd.config.a", 1, True)]
    rank = {p: i for i, p in enumerate(ORDER)}
    assert [e for e in edges if rank[part_of(e.target)] > rank[part_of(e.source)]] == edges[:1]
    assert _cycles(_import_time_graph(modules, edges)) == [sorted(modules)]


def test_no_module_name_repeats_its_package(graph):
    modules, _ = graph
    repeats = []
    for mod, path in modules.items():
        if path.name == "__init__.py" or "." not in mod.removeprefix("gkd."):
            continue
        package, _, name = mod.rpartition(".")
        package = package.rpartition(".")[2]
        stems = {package, package.removesuffix("s")}
        if any(name.startswith(stem) for stem in stems):
            repeats.append(mod)
    assert not repeats, f"module names that repeat their package's name: {repeats}"


def test_every_package_says_what_it_owns(graph):
    modules, _ = graph
    bare = [
        m
        for m, p in modules.items()
        if p.name == "__init__.py" and not ast.get_docstring(ast.parse(p.read_text()))
    ]
    assert not bare, f"packages without a docstring: {bare}"


def test_modules_and_functions_stay_readable(graph):
    modules, _ = graph
    long_modules, long_functions = [], []
    for path in modules.values():
        text = path.read_text()
        rel = str(path.relative_to(ROOT))
        if text.count("\n") > MAX_MODULE_LINES:
            long_modules.append(f"{rel}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and (rel, node.name) not in LONG_FUNCTIONS:
                    long_functions.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
    assert not long_modules, f"modules over {MAX_MODULE_LINES} lines: {long_modules}"
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"


def test_the_old_rank_entry_point_still_runs_the_trainer():
    """``python -m gkd.train`` (the entry point before the move) reaches the trainer's own argument parser."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "gkd.train", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "usage: python -m gkd.trainer" in done.stdout
