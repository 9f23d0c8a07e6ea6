"""The layers of nest/ (nest/__init__.py): no import climbs a layer, no module is part of an import cycle, and
the rules of each layer hold. Imports are read from the source (function-level ones included), not run."""
import ast
import sys
from pathlib import Path

import pytest

import nest
from tests.conftest import ROOT

PACKAGES = ("nest", "cuts")
COMMANDS = len(nest.LAYERS)  # everything in nest that no entry names
LIGHTNING = ("pytorch_lightning", "lightning", "lightning_fabric")
TORCH_ONLY = {"torch", "torchaudio"}  # besides the standard library, for nest.model and nest.objectives


def module_names() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = module_names()


def imports_of(name: str) -> set[str]:
    """Every module ``name`` imports, anywhere in its source: ours resolved to module names (``from a import b``
    gives ``a.b`` when that is a module of ours), others as their top-level name."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return {m if m.split(".")[0] in PACKAGES else m.split(".")[0] for m in found}


GRAPH = {name: {m for m in imports_of(name) if m in MODULES and m != name} for name in MODULES}


def layer(name: str) -> int:
    """The index of a nest module's layer (the root package: -1, below all)."""
    if name == "nest":
        return -1
    for i, entry in enumerate(nest.LAYERS):
        if name == entry or name.startswith(entry + "."):
            return i
    return COMMANDS


def test_no_import_climbs_a_layer():
    climbing = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
                for a in MODULES if a.startswith("nest") for b in GRAPH[a] if b.startswith("nest") and layer(b) > layer(a)]
    assert not climbing, "\n".join(climbing)


def test_cuts_never_imports_nest_and_only_config_and_above_import_cuts():
    config = nest.LAYERS.index("nest.config")
    wrong = [f"{a} imports {b}" for a in MODULES for b in GRAPH[a]
             if (a.startswith("cuts") and b.startswith("nest")) or (a.startswith("nest") and b.startswith("cuts")
                                                                    and layer(a) < config)]
    assert not wrong, "\n".join(wrong)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of more than one module (a module importing itself is excluded above)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_module_is_part_of_an_import_cycle():
    assert strongly_connected(GRAPH) == []


def test_the_cycle_check_sees_cycles():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_training_package_imports_lightning():
    wrong = sorted(name for name in MODULES if imports_of(name) & set(LIGHTNING) and not name.startswith("nest.training"))
    assert not wrong


def closure(name: str) -> set[str]:
    """Every module of ours that importing ``name`` runs: its imports, transitively, and their packages."""
    seen, todo = set(), [name]
    while todo:
        m = todo.pop()
        parts = m.split(".")
        for k in range(1, len(parts) + 1):
            parent = ".".join(parts[:k])
            if parent in MODULES and parent not in seen:
                seen.add(parent)
                todo.extend(GRAPH[parent])
    return seen


@pytest.mark.parametrize("name", ["nest.calibrate", "nest.training.step", "nest.training.meters", "nest.training.optim"])
def test_plain_torch_users_of_the_training_step_do_not_load_lightning(name):
    loads = sorted(m for m in closure(name) if imports_of(m) & set(LIGHTNING))
    assert not loads, f"importing {name} runs {loads}, which import Lightning"


def test_imports_are_statements_the_layer_checks_can_read():
    dynamic = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            called = node.func if isinstance(node, ast.Call) else None
            if isinstance(called, ast.Name) and called.id == "__import__" or \
                    isinstance(called, ast.Attribute) and called.attr == "import_module":
                dynamic.append(f"{name}:{node.lineno}")
    assert not dynamic, f"dynamic imports hide from the layer checks: {dynamic}"


@pytest.mark.parametrize("package", ["nest.model", "nest.objectives"])
def test_model_code_imports_only_torch(package):
    for name in MODULES:
        if name == package or name.startswith(package + "."):
            outside = {m for m in imports_of(name) if m not in MODULES} - TORCH_ONLY - set(sys.stdlib_module_names)
            assert not outside, f"{name} imports {outside}"


def test_no_class_is_longer_than_220_lines():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 220:
                long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, long
