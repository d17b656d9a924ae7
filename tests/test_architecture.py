"""The package's structure (docs/architecture.md), read from the source's imports:
the library imports neither the application nor the tools, the application imports
the tools only inside the function that runs one, no import runs back up the
library's layers, there is no import circle, and the library's functions stay short."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "gpucnn"

# The library's layers, bottom first: a module imports (at module level) only from
# its own layer or those below. gpucnn/__init__.py is the facade above them all.
LAYERS = [
    ("gpucnn.errors", "gpucnn.validate"),
    ("gpucnn.random", "gpucnn.backends.device", "gpucnn.backends.geometry"),
    ("gpucnn.backends",),
    ("gpucnn.backend",),  # the seam: the device functions and ops_for over both backends
    ("gpucnn.functional",),
    ("gpucnn.init", "gpucnn.interop", "gpucnn.onnx_export"),
    ("gpucnn.nn",),
    ("gpucnn.optim", "gpucnn.schedules", "gpucnn.augment", "gpucnn.step"),
    ("gpucnn.batches",),
    ("gpucnn.distributed",),  # data-parallel training over MPI ranks: above nn and step
]
APPLICATION, TOOLS = "gpucnn.app", "gpucnn.tools"
LONGEST_FUNCTION = 60  # lines, in the library


def _within(module, prefix):
    return module == prefix or module.startswith(prefix + ".")


def _modules():
    """{module name: (path, ast)} of every module in the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = (path, ast.parse(path.read_text(), str(path)))
    return out


MODULES = _modules()


def _resolve(modules, module, node):
    """The gpucnn modules an import statement of `module` names (a `from x import y`
    counts y where y is a module itself)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if _within(a.name, "gpucnn")]
    package = module if modules[module][0].name == "__init__.py" else module.rpartition(".")[0]
    if node.level:
        base = package.split(".")
        base = base[:len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if not _within(source, "gpucnn"):
        return []
    names = [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in modules]
    return names or [source]


def _imports(module, top_level_only, modules=MODULES):
    """(imported module, line) for the imports in `module`: those run when it is
    imported (top_level_only; not those inside functions), or all of them."""
    tree = modules[module][1]
    nodes = tree.body if top_level_only else ast.walk(tree)
    if top_level_only:  # statements under if/try at module level run at import too
        nodes = [n for top in tree.body for n in ast.walk(top)
                 if not any(isinstance(top, t) for t in (ast.FunctionDef, ast.ClassDef))]
        for top in tree.body:
            if isinstance(top, ast.ClassDef):  # class bodies run at import, methods do not
                nodes += [n for stmt in top.body if not isinstance(stmt, ast.FunctionDef)
                          for n in ast.walk(stmt)]
    return [(target, n.lineno) for n in nodes if isinstance(n, (ast.Import, ast.ImportFrom))
            for target in _resolve(modules, module, n)]


def _group(module):
    if _within(module, APPLICATION) or module == "gpucnn.__main__":  # `python -m gpucnn`
        return "application"
    if _within(module, TOOLS):
        return "tools"
    return "library"


def _layer(module):
    for i, prefixes in enumerate(LAYERS):
        if any(_within(module, p) for p in prefixes):
            return i
    return len(LAYERS)  # the facade, gpucnn/__init__.py


def test_every_library_module_has_a_layer():
    loose = [m for m in MODULES if _group(m) == "library" and m != "gpucnn"
             and _layer(m) == len(LAYERS)]
    assert not loose, f"library modules in no layer of LAYERS: {loose}"


def _library_imports_outside(modules):
    return [f"{m} imports {t} (line {line})" for m in modules if _group(m) == "library"
            and m != "gpucnn" for t, line in _imports(m, False, modules)
            if _group(t) != "library"]


def test_the_library_imports_neither_the_application_nor_the_tools():
    bad = _library_imports_outside(MODULES)
    assert not bad, "\n".join(bad)


def test_the_facade_imports_the_application_only_on_first_use():
    bad = [f"gpucnn/__init__.py imports {t} (line {line})"
           for t, line in _imports("gpucnn", top_level_only=True) if _group(t) != "library"]
    assert not bad, "\n".join(bad)


def test_the_application_imports_the_tools_only_to_run_them():
    bad = [f"{m} imports {t} at import time (line {line})" for m in MODULES
           if _group(m) == "application" for t, line in _imports(m, top_level_only=True)
           if _group(t) == "tools"]
    assert not bad, "\n".join(bad)


def _imports_up(modules):
    return [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)}, line {line})"
            for m in modules if _group(m) == "library" and m != "gpucnn"
            for t, line in _imports(m, True, modules)
            if _group(t) == "library" and _layer(t) > _layer(m)]


def test_no_import_runs_back_up_the_library_layers():
    bad = _imports_up(MODULES)
    assert not bad, "\n".join(bad)


def _circles(modules):
    """Strongly connected components of more than one module in the graph of the
    imports that run at import time (Tarjan's algorithm)."""
    graph = {m: sorted({t for t, _ in _imports(m, True, modules) if t in modules and t != m})
             for m in modules}
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
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
                out.append(sorted(component))
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    circles = _circles(MODULES)
    assert not circles, "\n".join("circle: " + ", ".join(c) for c in circles)


def test_library_functions_are_short():
    long = []
    for m, (path, tree) in MODULES.items():
        if _group(m) != "library":
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > LONGEST_FUNCTION:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} "
                                f"{node.name}: {length} lines")
    assert not long, "\n".join(long)


@pytest.mark.parametrize("module, target, check", [
    ("gpucnn.nn.conv", "gpucnn.app.models", _library_imports_outside),
    ("gpucnn.functional.conv", "gpucnn.nn", _imports_up),
    ("gpucnn.errors", "gpucnn.nn", _circles)])
def test_the_checks_see_a_violation(module, target, check):
    """Each rule above fails on a violation: one more import in a copy of the parsed source."""
    path, tree = MODULES[module]
    extra = ast.parse(f"import {target}").body[0]
    modules = dict(MODULES)
    modules[module] = (path, ast.Module(body=tree.body + [extra], type_ignores=[]))
    assert len(check(modules)) > len(check(MODULES))
