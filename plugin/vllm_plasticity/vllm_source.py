"""Reads a vLLM source tree with `ast`, never importing it: modules, their top-level names (followed through
`from x import y`) and class members (followed through base classes). vllm_seams.py checks its seams with it.

Runs anywhere (no vLLM import): on the installed vLLM's directory, or on the .py files of an unpacked wheel.

    >>> tree = VllmSource("/path/to/site-packages/vllm")
    >>> module, node = tree.definition("vllm.v1.engine.core_client", "AsyncMPClient")
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

MAX_IMPORT_HOPS = 8  # `from x import y` chains followed to find where y is defined


class VllmSource:
    """`source`: the `vllm` package directory (the one holding `__init__.py`), or a callable that maps a
    file path inside the package ("v1/engine/core_client.py") to its text, or None when there is none."""

    def __init__(self, source) -> None:
        if callable(source):
            self.root, self._read = None, source
        else:
            self.root = Path(source)
            self._read = lambda rel: (self.root / rel).read_text() if (self.root / rel).is_file() else None
        self._parsed: dict[str, tuple[ast.Module, bool] | None] = {}
        self.texts: dict[str, str] = {}  # module -> source text, for the modules parsed so far
        self._index: dict[str, list[str]] | None = None

    def module(self, name: str) -> tuple[ast.Module, bool] | None:
        """(the module's tree, whether it is a package), or None when the tree has no such module."""
        if name not in self._parsed:
            self._parsed[name] = None
            rel = name.split(".")[1:]
            for path, package in (("/".join(rel) + ".py", False), ("/".join(rel + ["__init__.py"]), True)):
                text = self._read(path) if rel or package else None
                if text is not None:
                    self.texts[name] = text
                    self._parsed[name] = (ast.parse(text), package)
                    break
        return self._parsed[name]

    def definition(self, module: str, name: str, hops: int = 0) -> tuple[str, ast.AST] | None:
        """Where top-level `name` of `module` is defined: (module, its node), following `from x import name`
        (the node is an ast.Module when `name` is a submodule)."""
        found = self.module(module)
        if found is None or hops > MAX_IMPORT_HOPS:
            return None
        tree, package = found
        statements = list(_top_level(tree.body))
        for node in statements:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                return module, node
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and name in assigned(node):
                return module, node
        for node in statements:
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        origin = _absolute(module, package, node)
                        hit = self.definition(origin, alias.name, hops + 1)
                        sub = self.module(f"{origin}.{alias.name}")
                        return hit or ((f"{origin}.{alias.name}", sub[0]) if sub else None)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname == name and self.module(alias.name):
                        return alias.name, self.module(alias.name)[0]
        sub = self.module(f"{module}.{name}") if package else None  # `from package import submodule`
        return (f"{module}.{name}", sub[0]) if sub else None

    def member(self, module: str, cls: ast.ClassDef, name: str, seen=None) -> tuple[str, ast.AST] | None:
        """`name` defined in class `cls`'s body or, failing that, in one of its bases."""
        for node in cls.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
                return module, node
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and name in assigned(node):
                return module, node
        for base_module, base in self.bases(module, cls, seen):
            hit = self.member(base_module, base, name, seen)
            if hit is not None:
                return hit
        return None

    def attributes(self, module: str, cls: ast.ClassDef, seen=None) -> set[str]:
        """Names a `cls` instance has by its source: class-body names, `self.X = ...`, registered buffers and
        parameters, in `cls` and its bases."""
        names = set()
        for node in cls.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                names |= assigned(node)
        for node in ast.walk(cls):
            if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                names |= assigned(node, on="self")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args
                  and node.func.attr in ("register_buffer", "register_parameter", "register_module", "add_module")
                  and isinstance(node.args[0], ast.Constant)):
                names.add(node.args[0].value)
        for base_module, base in self.bases(module, cls, seen):
            names |= self.attributes(base_module, base, seen)
        return names

    def bases(self, module: str, cls: ast.ClassDef, seen=None):
        """(module, class node) of each base of `cls` this tree defines, each class once per walk."""
        seen = set() if seen is None else seen
        for expr in cls.bases:
            expr = expr.value if isinstance(expr, ast.Subscript) else expr  # Base[M] -> Base
            hit = None
            if isinstance(expr, ast.Name):
                hit = self.definition(module, expr.id)
            elif isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name):  # mk.Base
                owner = self.definition(module, expr.value.id)
                if owner is not None and isinstance(owner[1], ast.Module):
                    hit = self.definition(owner[0], expr.attr)
            if hit is not None and isinstance(hit[1], ast.ClassDef) and (hit[0], hit[1].name) not in seen:
                seen.add((hit[0], hit[1].name))
                yield hit

    def moved(self, name: str, module: bool = False) -> str:
        """' (now in vllm.x, vllm.y)' where a directory tree defines `name` (a module's last part when
        `module`) elsewhere, ' (defined nowhere in this tree)' when none does, '' for a callable source."""
        if self.root is None:
            return ""
        if self._index is None:
            self._index = {}
            pattern = re.compile(r"^(?:class|def|async def)\s+(\w+)|^(\w+)\s*[:=]", re.M)
            for path in sorted(self.root.rglob("*.py")):
                parts = path.relative_to(self.root).with_suffix("").parts
                dotted = ".".join(("vllm", *parts)).removesuffix(".__init__")
                self._index.setdefault(f"module:{dotted.rsplit('.', 1)[-1]}", []).append(dotted)
                for m in pattern.finditer(path.read_text(errors="replace")):
                    self._index.setdefault(m.group(1) or m.group(2), []).append(dotted)
        places = sorted(set(self._index.get(f"module:{name}" if module else name, [])))
        return f" (now in {', '.join(places[:3])})" if places else " (defined nowhere in this tree)"


def parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[list[str], list[str]]:
    """(positional parameter names without self/cls, keyword-only names)."""
    args = node.args
    return ([a.arg for a in args.posonlyargs + args.args if a.arg not in ("self", "cls")],
            [a.arg for a in args.kwonlyargs])


def assigned(node, on: str | None = None) -> set[str]:
    """Names an assignment binds (`on="self"`: the attributes it sets on self)."""
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    names, stack = set(), list(targets)
    while stack:
        t = stack.pop()
        if isinstance(t, (ast.Tuple, ast.List)):
            stack.extend(t.elts)
        elif on is None and isinstance(t, ast.Name):
            names.add(t.id)
        elif on is not None and isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == on:
            names.add(t.attr)
    return names


def names_used(node: ast.AST) -> set[str]:
    """Attribute names, names and string constants in `node`'s source."""
    used = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Attribute):
            used.add(n.attr)
        elif isinstance(n, ast.Name):
            used.add(n.id)
        elif isinstance(n, ast.Constant) and isinstance(n.value, str):
            used.add(n.value)
    return used


def _top_level(body):
    """Module-level statements, including those under top-level if/try (TYPE_CHECKING, optional imports)."""
    for node in body:
        yield node
        if isinstance(node, ast.If):
            yield from _top_level(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            yield from _top_level(node.body + node.orelse + node.finalbody
                                  + [s for h in node.handlers for s in h.body])


def _absolute(module: str, package: bool, node: ast.ImportFrom) -> str:
    """The module a `from ... import` statement in `module` names."""
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    base = parts if package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))
