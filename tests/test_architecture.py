"""The layer rules of docs/architecture.md, checked by reading the source (``ast``; nothing is
imported, so no torch).

Every ``import`` counts: at module level, inside functions and under ``if TYPE_CHECKING``
(the cycle check alone skips those, which never run). An import of ``lofit_lens.a.b`` is an
edge to ``lofit_lens.a.b``; ``from lofit_lens.a import b`` is an edge to ``lofit_lens.a.b``
when that is a module, else to ``lofit_lens.a``. The parent packages that Python runs first
(``lofit_lens/__init__.py``) are not edges.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Iterable, NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "lofit_lens"

# docs/architecture.md: which lofit_lens modules each layer may import from outside itself.
BACKENDS_MAY_IMPORT = {"lofit_lens.errors", "lofit_lens.versions", "lofit_lens.disk",
                       "lofit_lens.padding"}
TASKS_MAY_IMPORT = {"lofit_lens.errors"}
ANALYSIS_OR_METHODS = ("lofit_lens.analysis", "lofit_lens.methods")


class Import(NamedTuple):
    module: str  # the importing module
    target: str  # the imported module
    line: int
    text: str  # the import statement as written
    typing_only: bool = False  # under ``if TYPE_CHECKING:``: never runs

    def __str__(self) -> str:
        return f"{self.module} (line {self.line}: {self.text!r}) imports {self.target}"


# ---------------------------------------------------------------------- the import graph
def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def python_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([name] if name else []))


def imports_in(tree: ast.AST, module: str, known: set[str], is_package: bool = False,
               source: str = "", prefixes: tuple[str, ...] = (PACKAGE,)) -> list[Import]:
    """The imports of one parsed module that name a module under ``prefixes``.

    ``known`` is the set of module names that exist, to tell ``from pkg import submodule`` from
    ``from pkg import name``."""
    found = []

    def keep(name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    lines = source.splitlines()

    def text(node) -> str:  # the statement as written, on one line
        return " ".join(" ".join(lines[node.lineno - 1:node.end_lineno]).split()) if lines else ""

    typing_only = {id(n) for block in ast.walk(tree) if _is_type_checking_block(block)
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if keep(alias.name):
                    found.append(Import(module, alias.name, node.lineno, text(node),
                                        id(node) in typing_only))
        elif isinstance(node, ast.ImportFrom):
            base = (_resolve_relative(module, is_package, node.level, node.module)
                    if node.level else node.module or "")
            if not keep(base):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append(Import(module, sub if sub in known else base, node.lineno,
                                    text(node), id(node) in typing_only))
    return found


def _is_type_checking_block(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` or ``if typing.TYPE_CHECKING:``."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def build_graph(folders: Iterable[Path], root: Path = ROOT,
                prefixes: tuple[str, ...] = (PACKAGE,)) -> list[Import]:
    files = [p for folder in folders for p in python_files(folder)]
    known = {module_name(p, root) for p in files}
    edges = []
    for path in files:
        source = path.read_text()
        name = module_name(path, root)
        edges += imports_in(ast.parse(source, str(path)), name, known,
                            is_package=path.name == "__init__.py", source=source, prefixes=prefixes)
    return sorted(edges, key=lambda e: (e.module, e.line, e.target))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None (iterative DFS, stable order)."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = {node: WHITE for node in graph}
    for targets in graph.values():
        for t in targets:
            colour.setdefault(t, WHITE)
    for start in sorted(colour):
        if colour[start] != WHITE:
            continue
        path, stack = [start], [iter(sorted(graph.get(start, ())))]
        colour[start] = GREY
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                colour[path.pop()] = BLACK
                stack.pop()
            elif colour[nxt] == GREY:
                return path[path.index(nxt):] + [nxt]
            elif colour[nxt] == WHITE:
                colour[nxt] = GREY
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def adjacency(edges: Iterable[Import], runtime_only: bool = True) -> dict[str, set[str]]:
    """``module -> {imported modules}``; by default without ``TYPE_CHECKING`` imports."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        if e.target != e.module and not (runtime_only and e.typing_only):
            graph.setdefault(e.module, set()).add(e.target)
    return graph


def inside(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def public_names(init: Path = ROOT / PACKAGE / "__init__.py") -> set[str]:
    """``lofit_lens.__all__``, read from the source (a literal list)."""
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    raise AssertionError(f"{init} defines no literal __all__")


def notebook_code(path: Path) -> str:
    """The code cells of a notebook, IPython magics and shell lines commented out."""
    cells = json.loads(path.read_text())["cells"]
    lines = []
    for i, cell in enumerate(cells):
        if cell.get("cell_type") != "code":
            continue
        src = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        lines.append(f"# cell {i}")
        lines += ["# " + l if l.lstrip().startswith(("%", "!")) else l for l in src.splitlines()]
    return "\n".join(lines)


def notebook_violations(source: str, public: set[str], label: str) -> list[str]:
    """Uses of ``lofit_lens`` in notebook code other than its public names: submodule
    imports, ``from lofit_lens import <not in __all__>``, and ``ll.<not in __all__>``."""
    tree = ast.parse(source)
    cell = {}
    current = 0
    for n, line in enumerate(source.splitlines(), 1):
        if line.startswith("# cell "):
            current = int(line.split()[-1])
        cell[n] = current
    bad, aliases = [], set()

    def where(node) -> str:
        return f"{label} cell {cell.get(node.lineno, '?')}"

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == PACKAGE:
                    aliases.add(a.asname or a.name)
                elif inside(a.name, PACKAGE):
                    bad.append(f"{where(node)}: 'import {a.name}' imports a submodule")
        elif isinstance(node, ast.ImportFrom) and node.module and inside(node.module, PACKAGE):
            names = ", ".join(a.name for a in node.names)
            if node.module != PACKAGE:
                public_ones = [a.name for a in node.names if a.name in public]
                hint = f"; public: {', '.join(public_ones)}" if public_ones else ""
                bad.append(f"{where(node)}: 'from {node.module} import {names}' imports a "
                           f"submodule (use the names in lofit_lens.__all__{hint})")
            else:
                for a in node.names:
                    if a.name not in public:
                        bad.append(f"{where(node)}: 'from lofit_lens import {a.name}': "
                                   f"{a.name} is not in lofit_lens.__all__")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and node.attr not in public
                and not node.attr.startswith("__")):
            bad.append(f"{where(node)}: '{node.value.id}.{node.attr}' is not in lofit_lens.__all__")
    return bad


def undefined_names(source: str) -> list[str]:
    """Names a notebook reads but never binds (not an assignment, import, def, argument,
    loop or ``with`` target anywhere, nor a builtin): what a kernel stops on with NameError."""
    import builtins

    tree = ast.parse(source)
    bound = set(dir(builtins)) | {"display", "get_ipython"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return sorted({f"line {node.lineno}: {node.id}" for node in ast.walk(tree)
                   if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)
                   and node.id not in bound})


# ---------------------------------------------------------------------- the graph of this tree
@pytest.fixture(scope="module")
def edges() -> list[Import]:
    return build_graph([ROOT / PACKAGE, ROOT / "analysis"], prefixes=(PACKAGE, "analysis"))


@pytest.fixture(scope="module")
def package_edges(edges) -> list[Import]:
    return [e for e in edges if inside(e.module, PACKAGE) and inside(e.target, PACKAGE)]


def layer(module: str) -> str:
    """core, backends, tasks, eval, methods, analysis, cli, package (``lofit_lens`` itself),
    main (``lofit_lens.__main__``) or figures (the scripts in analysis/)."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return "figures"
    if len(parts) == 1:
        return "package"
    if parts[1] in ("backends", "tasks", "eval", "methods", "analysis"):
        return parts[1]
    return {"cli": "cli", "__main__": "main"}.get(parts[1], "core")


def test_graph_covers_the_tree(edges, package_edges):
    modules = {e.module for e in edges}
    # Each layer has modules that import something, and the resolver finds submodules.
    assert {"lofit_lens.api", "lofit_lens.backends.models", "lofit_lens.cli"} <= modules
    assert any(e.target == "lofit_lens.backends.hooked" for e in package_edges)
    assert any(layer(e.module) == "figures" for e in edges), "analysis/*.py not read"


def test_no_module_name_in_both_analysis_trees():
    """analysis/ (the scripts) and lofit_lens/analysis/ (the library) share no module name,
    so a reader never wonders which ``claims`` a traceback means."""
    root = Path(__file__).resolve().parents[1]
    scripts = {p.stem for p in (root / "analysis").glob("*.py")} - {"__init__"}
    library = {p.stem for p in (root / "lofit_lens" / "analysis").glob("*.py")} - {"__init__"}
    assert not scripts & library, f"in both trees: {sorted(scripts & library)}"


def test_plotly_only_in_plotting():
    """The views are one module: lofit_lens/analysis/plotting.py is the only one of
    lofit_lens and analysis/ that imports plotly (the scripts draw through it)."""
    views = ROOT / PACKAGE / "analysis" / "plotting.py"
    bad = []
    for path in python_files(ROOT / PACKAGE) + python_files(ROOT / "analysis"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                     else [])
            if path != views and any(inside(name, "plotly") for name in names):
                bad.append(f"{path.relative_to(ROOT)} (line {node.lineno})")
    assert not bad, "only lofit_lens/analysis/plotting.py may import plotly:\n" + "\n".join(bad)


def test_one_statistics_module():
    """lofit_lens/stats.py is the one statistics module (intervals, paired tests, power), at
    core level, so the core (compare's tables) and the analyses share it."""
    found = sorted(p.relative_to(ROOT).as_posix() for p in python_files(ROOT / PACKAGE)
                   if p.stem in ("stats", "intervals"))
    assert found == ["lofit_lens/stats.py"], f"statistics modules: {found}"


def test_no_import_cycles(edges):
    cycle = find_cycle(adjacency(edges))
    if cycle:
        steps = []
        for a, b in zip(cycle, cycle[1:]):
            e = next(e for e in edges if e.module == a and e.target == b and not e.typing_only)
            steps.append(f"  {e}")
        pytest.fail("import cycle " + " -> ".join(cycle) + ":\n" + "\n".join(steps))


def test_nothing_imports_the_cli(edges):
    bad = [str(e) for e in edges
           if e.target == "lofit_lens.cli" and e.module not in ("lofit_lens.__main__", "lofit_lens.cli")]
    assert not bad, "only the command line may use lofit_lens.cli:\n" + "\n".join(bad)


def test_lower_layers_do_not_import_analysis_or_methods(package_edges):
    bad = [str(e) for e in package_edges
           if layer(e.module) in ("core", "backends", "tasks", "eval")
           and any(inside(e.target, p) for p in ANALYSIS_OR_METHODS)]
    assert not bad, ("core, backends, tasks and eval must not import lofit_lens.analysis or "
                     "lofit_lens.methods:\n" + "\n".join(bad))


@pytest.mark.parametrize("name, allowed", [("backends", BACKENDS_MAY_IMPORT),
                                           ("tasks", TASKS_MAY_IMPORT)])
def test_bottom_layers_import_only_errors_and_versions(package_edges, name, allowed):
    bad = [str(e) for e in package_edges
           if layer(e.module) == name and layer(e.target) != name and e.target not in allowed]
    assert not bad, (f"lofit_lens.{name} may import only {sorted(allowed)} from outside "
                     "itself:\n" + "\n".join(bad))


def test_what_backends_import_imports_nothing_else(package_edges):
    """The modules backends may import (errors, versions, disk, padding) are leaves: they
    import only each other, so backends stays readable on its own."""
    bad = [str(e) for e in package_edges
           if e.module in BACKENDS_MAY_IMPORT and e.target not in BACKENDS_MAY_IMPORT]
    assert not bad, (f"{sorted(BACKENDS_MAY_IMPORT)} may import only each other:\n"
                     + "\n".join(bad))


NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebooks_use_only_the_public_api(path):
    bad = notebook_violations(notebook_code(path), public_names(), path.name)
    assert not bad, "notebooks use only `import lofit_lens as ll` and lofit_lens.__all__:\n" + "\n".join(bad)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebooks_bind_every_name_they_read(path):
    missing = undefined_names(notebook_code(path))
    assert not missing, f"{path.name} reads names it never defines or imports:\n" + "\n".join(missing)


def test_undefined_names_finds_a_name_never_bound():
    assert undefined_names("import lofit_lens as ll\nm = ll.x\nn = model_dims(m)") == [
        "line 3: model_dims"]
    assert undefined_names("for i in range(2):\n    print(i)\nf = lambda x: x\n") == []


# ---------------------------------------------------------------------- the helpers themselves
def test_find_cycle_on_synthetic_graphs():
    assert find_cycle({}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}}) is None  # a diamond
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"a"}, "a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_imports_are_resolved_at_every_level(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from lofit_lens.core import thing\n")
    (pkg / "core.py").write_text(
        "import os\nimport lofit_lens.sub.leaf\n"
        "def f():\n    from lofit_lens.sub import leaf, helper\n    from . import errors\n"
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lofit_lens.cli import main\n")
    (pkg / "errors.py").write_text("")
    (pkg / "cli.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .leaf import x\nhelper = 1\n")
    (pkg / "sub" / "leaf.py").write_text("from ..errors import E\nx = 1\n")
    got = {(e.module, e.target, e.line, e.typing_only) for e in build_graph([pkg], root=tmp_path)}
    assert got == {
        ("lofit_lens", "lofit_lens.core", 1, False),
        ("lofit_lens.core", "lofit_lens.sub.leaf", 2, False),   # import a.b.c
        ("lofit_lens.core", "lofit_lens.sub.leaf", 4, False),   # in a function: from a.b import c
        ("lofit_lens.core", "lofit_lens.sub", 4, False),        # ... and a name of the package
        ("lofit_lens.core", "lofit_lens.errors", 5, False),     # relative, in a function
        ("lofit_lens.core", "lofit_lens.cli", 8, True),         # under TYPE_CHECKING
        ("lofit_lens.sub", "lofit_lens.sub.leaf", 1, False),    # relative from a package
        ("lofit_lens.sub.leaf", "lofit_lens.errors", 1, False),  # two levels up
    }
    assert find_cycle(adjacency(build_graph([pkg], root=tmp_path))) is None
    (pkg / "errors.py").write_text("def g():\n    import lofit_lens.core\n")
    cycle = find_cycle(adjacency(build_graph([pkg], root=tmp_path)))
    assert cycle == ["lofit_lens.core", "lofit_lens.errors", "lofit_lens.core"]
    # A cycle through a TYPE_CHECKING import never runs: not a cycle.
    (pkg / "errors.py").write_text("")
    (pkg / "cli.py").write_text("import typing\nif typing.TYPE_CHECKING:\n    import lofit_lens.core\n")
    graph = build_graph([pkg], root=tmp_path)
    assert find_cycle(adjacency(graph)) is None
    assert find_cycle(adjacency(graph, runtime_only=False)) == ["lofit_lens.core", "lofit_lens.cli", "lofit_lens.core"]


def test_layer_rules_catch_a_violation():
    e = Import("lofit_lens.backends.hf", "lofit_lens.tasks.base", 3, "from lofit_lens.tasks.base import X")
    with pytest.raises(AssertionError, match=r"lofit_lens\.backends\.hf \(line 3: .*\) imports lofit_lens\.tasks\.base"):
        test_bottom_layers_import_only_errors_and_versions([e], "backends", BACKENDS_MAY_IMPORT)
    test_bottom_layers_import_only_errors_and_versions(
        [Import("lofit_lens.backends.hf", "lofit_lens.errors", 1, ""),
         Import("lofit_lens.backends.hf", "lofit_lens.backends.hooked", 2, "")],
        "backends", BACKENDS_MAY_IMPORT)
    with pytest.raises(AssertionError, match="lofit_lens.doctor"):
        test_lower_layers_do_not_import_analysis_or_methods(
            [Import("lofit_lens.doctor", "lofit_lens.methods.iti", 9, "import x")])
    with pytest.raises(AssertionError, match="lofit_lens.tasks.base"):
        test_bottom_layers_import_only_errors_and_versions(
            [Import("lofit_lens.tasks.base", "lofit_lens.config", 1, "")], "tasks", TASKS_MAY_IMPORT)
    with pytest.raises(AssertionError, match="lofit_lens.api"):
        test_nothing_imports_the_cli([Import("lofit_lens.api", "lofit_lens.cli", 1, "")])
    test_nothing_imports_the_cli([Import("lofit_lens.__main__", "lofit_lens.cli", 1, "")])


def test_notebook_check_on_synthetic_code():
    public = {"load_model", "lofit"}
    code = ("# cell 0\nimport lofit_lens as ll\n# %matplotlib inline\nm = ll.load_model()\n"
            "# cell 3\nfrom lofit_lens import lofit, _secret\nfrom lofit_lens.api import Cells, lofit\n"
            "import lofit_lens.tasks\nx = ll.analysis.cells\n")
    bad = notebook_violations(code, public, "nb")
    assert bad == [
        "nb cell 3: 'from lofit_lens import _secret': _secret is not in lofit_lens.__all__",
        "nb cell 3: 'from lofit_lens.api import Cells, lofit' imports a submodule "
        "(use the names in lofit_lens.__all__; public: lofit)",
        "nb cell 3: 'import lofit_lens.tasks' imports a submodule",
        "nb cell 3: 'll.analysis' is not in lofit_lens.__all__",
    ]
    assert notebook_violations("import lofit_lens as ll\nll.lofit(ll.load_model())\n", public, "nb") == []
