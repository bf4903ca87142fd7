"""The package's import graph, read from the source: no cycle between modules, no library module
importing the argument core (library code takes config objects), mpu importing nothing of the
model, and every module importable on its own."""
import ast
import importlib
import os
import pkgutil

import megatron_t2i

PACKAGE = os.path.dirname(megatron_t2i.__file__)
ARGUMENT_CORE = "megatron_t2i.arguments"
CLI = "megatron_t2i.cli"  # the tools' entry points: flags -> configs, like pretrain.py


def modules() -> dict[str, str]:
    """module name -> file, for every module of the package."""
    found = {}
    for info in pkgutil.walk_packages([PACKAGE], "megatron_t2i."):
        spec = importlib.util.find_spec(info.name)
        found[info.name] = spec.origin
    found["megatron_t2i"] = megatron_t2i.__file__
    return found


def imports_of(name: str, path: str, known: set[str]) -> set[str]:
    """The package modules that `name` imports, at any depth of its code (lazy imports too)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `from pkg import module` or a name in it
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    edges = {name: imports_of(name, path, known) for name, path in found.items()}
    # a package's __init__ re-exporting its modules is not a dependency of those modules on it
    return {name: {t for t in targets if not name.startswith(t + ".")}
            for name, targets in edges.items()}


def test_no_import_cycle():
    edges = graph()
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_library_modules_never_import_the_argument_core():
    edges = graph()
    offenders = sorted(name for name, targets in edges.items()
                       if ARGUMENT_CORE in targets and not name.startswith(CLI)
                       and name != ARGUMENT_CORE)
    assert offenders == [], f"library modules importing {ARGUMENT_CORE}: {offenders}"
    # and none builds or reads an argparse namespace itself
    for name, path in modules().items():
        if name == ARGUMENT_CORE or name.startswith(CLI):
            continue
        assert "argparse" not in open(path, encoding="utf-8").read(), name


def test_mpu_knows_nothing_of_the_model():
    edges = graph()
    for name, targets in edges.items():
        if name.startswith("megatron_t2i.mpu"):
            outside = {t for t in targets if not t.startswith("megatron_t2i.mpu")}
            assert not outside, f"{name} imports {sorted(outside)}"


def test_every_module_imports():
    for name in modules():
        importlib.import_module(name)
