"""What an entry-point group registers, read from source without importing it (so `sparsevlm list`
never imports torch); the classes themselves are imported only when one is built.

For each entry point of a group, the module it names (a package: every module in its folder, which is what
the package's own `__init__` imports), and in it each class decorated with `@<decorator>("name", ...)`: an
`Entry` with the decorator's literal arguments, the first line of the class docstring, and the class
attributes given as literals (or as module-level literal constants; anything else raises ValueError, and the
caller imports the class instead), looked up through the base classes, which are found by following the
modules' imports. A module that names the decorator but in which no decorated class is found (it registers
in some other way), or whose source is not at hand, is imported instead, and the caller reads what it
registered.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import pkgutil
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any


@dataclass
class _Module:
    name: str
    path: Path
    tree: ast.Module

    @functools.cached_property
    def classes(self) -> dict[str, ast.ClassDef]:
        return {n.name: n for n in self.tree.body if isinstance(n, ast.ClassDef)}

    @functools.cached_property
    def constants(self) -> dict[str, ast.expr]:
        out = {}
        for n in self.tree.body:
            if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name):
                out[n.targets[0].id] = n.value
            elif isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.value is not None:
                out[n.target.id] = n.value
        return out

    @functools.cached_property
    def imports(self) -> dict[str, tuple[str, str]]:
        """Local name -> (absolute module, name) of the module's `from X import name` statements."""
        out = {}
        package = self.name if self.path.name == "__init__.py" else self.name.rpartition(".")[0]
        for n in ast.walk(self.tree):
            if isinstance(n, ast.ImportFrom):
                mod = importlib.util.resolve_name("." * n.level + (n.module or ""), package) if n.level else n.module
                for a in n.names:
                    out[a.asname or a.name] = (mod, a.name)
        return out


def _module_path(name: str) -> Path | None:
    """The source file of a module, found without importing it or its parent packages."""
    top, *rest = name.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None:
        return None
    if not rest:
        return Path(spec.origin) if spec.origin and spec.origin.endswith(".py") else None
    for base in spec.submodule_search_locations or []:
        stem = Path(base, *rest)
        for p in (stem.with_suffix(".py"), stem / "__init__.py"):
            if p.is_file():
                return p
    return None


@functools.lru_cache(maxsize=None)
def _parse(name: str) -> _Module | None:
    path = _module_path(name)
    if path is None:
        return None
    return _Module(name, path, ast.parse(path.read_text(encoding="utf-8"), str(path)))


@dataclass
class Entry:
    """One registered class as its source declares it."""

    name: str  # the decorator's first argument
    args: tuple  # all of the decorator's arguments
    module: str
    qualname: str
    doc: str  # first line of the class docstring
    _node: ast.ClassDef
    _mod: _Module

    def attr(self, *names: str) -> tuple[str, Any] | None:
        """(name, literal value) of the first of `names` a class defines, looking through the class and
        then its bases (depth-first); None when none does."""
        return _lookup(self._mod, self._node, names)

    def init_params(self) -> list[str]:
        """The parameters of the class's `__init__` (its own or a base's), `self` included."""
        fn = _find(self._mod, self._node, lambda n: isinstance(n, ast.FunctionDef) and n.name == "__init__")
        if fn is None:
            return ["self"]
        a = fn.args
        return [p.arg for p in [*a.posonlyargs, *a.args, *a.kwonlyargs]]


def _literal(mod: _Module, node: ast.expr) -> Any:
    if isinstance(node, ast.Name) and node.id in mod.constants:
        return _literal(mod, mod.constants[node.id])
    return ast.literal_eval(node)


def _bases(mod: _Module, node: ast.ClassDef):
    """(module, class node) of each base class whose source can be found."""
    for b in node.bases:
        if not isinstance(b, ast.Name):
            continue
        if b.id in mod.classes:
            yield mod, mod.classes[b.id]
        elif b.id in mod.imports:
            src, cls = mod.imports[b.id]
            other = _parse(src)
            if other is not None and cls in other.classes:
                yield other, other.classes[cls]


def _find(mod: _Module, node: ast.ClassDef, pred):
    for n in node.body:
        if pred(n):
            return n
    for m, b in _bases(mod, node):
        found = _find(m, b, pred)
        if found is not None:
            return found
    return None


def _lookup(mod: _Module, node: ast.ClassDef, names: tuple[str, ...]) -> tuple[str, Any] | None:
    for n in node.body:
        target = n.targets[0] if isinstance(n, ast.Assign) and len(n.targets) == 1 else getattr(n, "target", None)
        if isinstance(target, ast.Name) and target.id in names and getattr(n, "value", None) is not None:
            return target.id, _literal(mod, n.value)
    for m, b in _bases(mod, node):
        found = _lookup(m, b, names)
        if found is not None:
            return found
    return None


def _decorated(mod: _Module, decorator: str) -> list[Entry]:
    out = []
    for node in mod.classes.values():
        for d in node.decorator_list:
            fn = d.func if isinstance(d, ast.Call) else None
            name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else None
            if name == decorator and d.args:
                args = tuple(_literal(mod, a) for a in d.args)
                doc = (ast.get_docstring(node) or "").strip()
                out.append(Entry(args[0], args, mod.name, node.name, doc.splitlines()[0] if doc else "", node, mod))
    return out


def _group_modules(group: str) -> list[str]:
    names = []
    for ep in entry_points(group=group):
        module = ep.value.partition(":")[0]
        path = _module_path(module)
        if path is not None and path.name == "__init__.py":
            names += [f"{module}.{m.name}" for m in pkgutil.iter_modules([str(path.parent)])]
        else:
            names.append(module)
    return names


def scan(group: str, decorator: str) -> list[Entry]:
    """The entries of an entry-point group's modules (see the module docstring), in module order."""
    out = []
    for name in _group_modules(group):
        mod = _parse(name)
        try:
            found = _decorated(mod, decorator) if mod is not None else []
        except ValueError:  # a decorator argument that is not a literal
            found = []
        if not found and (mod is None or decorator in mod.path.read_text(encoding="utf-8")):
            importlib.import_module(name)  # registers in a way its source does not show
        out += found
    return out
