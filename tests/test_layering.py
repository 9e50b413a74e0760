"""The package's layering, read from the source with `ast` (no import is executed, no root needed).

The rules: the front end (tcpha.fe) and the back end (tcpha.be) are siblings on a
shared floor, so neither imports the other; library code never imports the command line (tcpha.cli;
a package's ``__main__`` module, ``python -m tcpha.fe``, is command line itself and may);
the module graph of top-level imports has no cycle; and an import inside a function (of any module:
tcpha's, the standard library's, a third party's) is allowed only when it says why, with a comment
`# lazy: <why>` on its line or on the line above it or above the block of import lines it starts.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "tcpha"
LAZY_MARK = "# lazy:"


@dataclass(frozen=True)
class Import:
    module: str        # the importing module, e.g. "tcpha.fe.worker"
    target: str        # the imported tcpha module, e.g. "tcpha.steering"
    line: int
    top_level: bool    # False when the import statement is inside a function
    marked_lazy: bool  # a `# lazy: why` comment on the line or the line above

    def where(self) -> str:
        return f"{self.module.replace('.', '/')}.py:{self.line}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module an imported dotted name lands in: the name itself, or its parent for `from m import f`."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _inside_function(stack: list[ast.AST]) -> bool:
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) for n in stack)


def _under_type_checking(stack: list[ast.AST]) -> bool:
    for n in stack:
        if isinstance(n, ast.If):
            test = n.test
            if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                    isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
                return True
    return False


def _is_import_line(line: str) -> bool:
    return line.lstrip().startswith(("import ", "from "))


def marked_lazy(lines: list[str], lineno: int) -> bool:
    """A `# lazy: why` comment on the import's line, or on the line above it or above the run of
    import lines it is part of (one comment for `import pyfuse3` and `import trio` below it)."""
    if LAZY_MARK in lines[lineno - 1]:
        return True
    above = lineno - 2
    while above >= 0 and _is_import_line(lines[above]):
        above -= 1
    return above >= 0 and lines[above].strip().startswith(LAZY_MARK)


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source, str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def marked(lineno: int) -> bool:
        return marked_lazy(lines, lineno)

    def visit(node: ast.AST, stack: list[ast.AST]) -> None:
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod.
            targets = [f"{base}.{alias.name}" for alias in node.names]
        if targets and not _under_type_checking(stack):
            for name in targets:
                if not name.startswith("tcpha"):
                    continue
                target = _resolve(name, modules)
                if target is not None and target != module:
                    found.append(Import(module, target, node.lineno, not _inside_function(stack),
                                        marked(node.lineno)))
        for child in ast.iter_child_nodes(node):
            visit(child, stack + [node])

    visit(tree, [])
    return found


def unexplained_function_imports(path: Path) -> list[tuple[int, str]]:
    """(line, statement) of each import inside a function, of any module, without a `# lazy:` reason
    (imports under `if TYPE_CHECKING:` run at no time and are not counted)."""
    source = path.read_text()
    lines = source.splitlines()
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, stack: list[ast.AST]) -> None:
        if (isinstance(node, (ast.Import, ast.ImportFrom)) and _inside_function(stack)
                and not _under_type_checking(stack) and not marked_lazy(lines, node.lineno)):
            found.append((node.lineno, lines[node.lineno - 1].strip()))
        for child in ast.iter_child_nodes(node):
            visit(child, stack + [node])

    visit(ast.parse(source, str(path)), [])
    return found


def all_imports() -> list[Import]:
    """Every tcpha import of the package, once per statement and imported module."""
    modules = package_modules()
    found = [imp for name, path in modules.items() for imp in imports_of(name, path, modules)]
    return list(dict.fromkeys(found))


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
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
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return components


# --- the rules --------------------------------------------------------------------------------------

def test_front_end_never_imports_back_end():
    bad = [f"{i.where()}: imports {i.target}" for i in all_imports()
           if _in(i.module, "tcpha.fe") and _in(i.target, "tcpha.be")]
    assert not bad, "fe imports be (move what both use below them):\n" + "\n".join(bad)


def test_back_end_never_imports_front_end():
    bad = [f"{i.where()}: imports {i.target}" for i in all_imports()
           if _in(i.module, "tcpha.be") and _in(i.target, "tcpha.fe")]
    assert not bad, "be imports fe (move what both use below them):\n" + "\n".join(bad)


def test_library_never_imports_cli():
    bad = [f"{i.where()}: imports {i.target}" for i in all_imports()
           if not _in(i.module, "tcpha.cli") and not i.module.endswith(".__main__") and _in(i.target, "tcpha.cli")]
    assert not bad, "library code imports tcpha.cli (move what it needs out of cli/):\n" + "\n".join(bad)


def test_no_import_cycles():
    edges: dict[str, set[str]] = {}
    for i in all_imports():
        if i.top_level:
            edges.setdefault(i.module, set()).add(i.target)
    cycles = find_cycles(edges)
    assert not cycles, "modules importing each other in a circle:\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_imports_inside_functions_say_why():
    """Every import inside a function, of any module, says why it is there and not at the top."""
    bad = [f"{path.relative_to(PACKAGE_DIR.parent)}:{line}: {text}" for path in package_modules().values()
           for line, text in unexplained_function_imports(path)]
    assert not bad, (f"imports inside functions without a '{LAZY_MARK} why' comment (move them to the top "
                     f"of the module, or say why not: optional, heavy, a circle):\n" + "\n".join(bad))


# --- the checker checks itself ----------------------------------------------------------------------

def test_checker_sees_each_kind_of_import(tmp_path):
    modules = {"tcpha.fe.a": tmp_path / "a.py", "tcpha.be.b": tmp_path / "b.py", "tcpha.cli.c": tmp_path / "c.py"}
    modules["tcpha.fe.a"].write_text(
        "from tcpha.be import b\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from tcpha.cli import c\n"
        "def f():\n"
        "    from tcpha.cli.c import main\n"
        "    # lazy: heavy\n"
        "    import tcpha.be.b\n")
    found = imports_of("tcpha.fe.a", modules["tcpha.fe.a"], modules)
    assert [(i.target, i.line, i.top_level, i.marked_lazy) for i in found] == [
        ("tcpha.be.b", 1, True, False), ("tcpha.cli.c", 6, False, False), ("tcpha.be.b", 8, False, True)]


def test_checker_sees_every_import_inside_a_function(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(
        "import os\n"                         # top level: fine
        "from typing import TYPE_CHECKING\n"
        "def f():\n"
        "    import re\n"                     # 4: standard library, no reason
        "    # lazy: optional and slow\n"
        "    import pyfuse3\n"                # the block below the comment is explained
        "    import trio  # noqa: F401\n"
        "    x = 1\n"
        "    import json\n"                   # 9: after other code, the comment does not reach it
        "    if TYPE_CHECKING:\n"
        "        import socket\n"             # not run: fine
        "    from tcpha import repair  # lazy: a circle\n"
        "    return lambda: __import__('os')\n"
        "class C:\n"
        "    def m(self):\n"
        "        from . import sibling\n")    # 16: relative, in a method
    assert unexplained_function_imports(path) == [
        (4, "import re"), (9, "import json"), (16, "from . import sibling")]


def test_checker_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_every_module_is_on_the_architecture_page():
    """docs/architecture.md lists every module of the package with one line (a new module is added there)."""
    page = (PACKAGE_DIR.parent / "docs" / "architecture.md").read_text()
    missing = [str(p.relative_to(PACKAGE_DIR.parent)) for p in sorted(PACKAGE_DIR.rglob("*.py"))
               if p.name != "__main__.py" and (p.name != "__init__.py" or ast.get_docstring(ast.parse(p.read_text())))
               and f"`{p.relative_to(PACKAGE_DIR.parent)}`" not in page]
    assert not missing, f"not on docs/architecture.md: {', '.join(missing)}"
