"""Shrink the shipped sources with the ast module at bundle time, so the repo keeps its comments and docstrings.

    sources = {"shared.loop": "...", "__main__": "..."}   # every module the bundle carries
    small = minify_modules(sources)                      # same keys, minified sources

What it does, each step safe by construction and checked on the whole set:
  - drops comments (ast.unparse never writes them) and docstrings (a leading string statement);
  - drops the annotations of function arguments and returns (`from __future__ import annotations` keeps them
    unevaluated strings, and nothing in the shipped code reads them back); class-level annotations stay, since
    dataclasses and NamedTuples read those;
  - renames a function's local variables to short names, only where the function has no nested scope that
    could see them, no global/nonlocal/import binding of that name and no locals()/vars()/eval/exec;
    arguments keep their names (a caller may pass them by keyword);
  - drops top-level functions and classes whose name appears nowhere else in the shipped code, neither as a
    name, an attribute nor a word inside a string (so getattr(x, "name") and __all__ keep theirs), repeated
    until nothing more goes;
  - indents one space per level.
The output is deterministic: the same sources always give the same text.
"""
from __future__ import annotations

import ast
import builtins
import itertools
import keyword
import re
import string

_WORD = re.compile(r"\w+")
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)
_DYNAMIC = ("locals", "vars", "eval", "exec")
RESERVED = frozenset(dir(builtins)) | frozenset(keyword.kwlist) | {"self", "cls", "__class__"}


def _is_docstring(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


class _Strip(ast.NodeTransformer):
    """Docstrings (any bare string statement) and function annotations."""

    def generic_visit(self, node: ast.AST) -> ast.AST:
        super().generic_visit(node)
        for field in ("body", "orelse", "finalbody"):
            body = getattr(node, field, None)
            if isinstance(body, list) and body and isinstance(body[0], ast.stmt):
                kept = [s for s in body if not _is_docstring(s)]
                setattr(node, field, kept or ([ast.Pass()] if field == "body" else []))
        return node

    def _function(self, node):
        a = node.args
        for arg in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg]:
            if arg is not None:
                arg.annotation = None
        node.returns = None
        return self.generic_visit(node)

    visit_FunctionDef = visit_AsyncFunctionDef = _function


def _short_names():
    for n in itertools.count(1):
        for letters in itertools.product(string.ascii_letters, repeat=n):
            yield "".join(letters)


def _arg_names(fn) -> set[str]:
    a = fn.args
    return {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg] if x is not None}


def _own_nodes(fn):
    """Nodes of fn's body outside any nested scope; the nested scopes themselves are yielded as roots."""
    stack = list(reversed(fn.body))
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, _SCOPES):
            stack.extend(reversed(list(ast.iter_child_nodes(node))))


def _renamable(fn, module_globals: set[str]) -> list[str]:
    """fn's local variables that can take another name without any reader noticing, in binding order.

    A name bound only as a comprehension's target is local to that comprehension: elsewhere in fn the same
    name may read a global, so such a name is kept when the module binds it at top level.
    """
    bound, unsafe, comp_targets = [], set(_arg_names(fn)), set()
    for node in _own_nodes(fn):
        if isinstance(node, ast.comprehension):
            comp_targets.update(id(n) for n in ast.walk(node.target) if isinstance(n, ast.Name))
    function_level = set()
    for node in _own_nodes(fn):
        if isinstance(node, _SCOPES):  # a nested scope may read fn's locals as free variables: keep every name it uses
            unsafe.add(getattr(node, "name", ""))
            unsafe.update(n.id for n in ast.walk(node) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            unsafe.update(node.names)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            unsafe.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _DYNAMIC:
            return []
        elif isinstance(node, ast.Match):  # capture patterns bind names that are not ast.Name nodes
            return []
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.append(node.id)
            if id(node) not in comp_targets:
                function_level.add(node.id)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.append(node.name)
            function_level.add(node.name)
    unsafe |= (set(bound) - function_level) & module_globals
    return [n for n in dict.fromkeys(bound) if n not in unsafe and n not in RESERVED and len(n) > 1]


def _module_globals(tree: ast.Module) -> set[str]:
    """Names bound at module level (outside every function and class body)."""
    names, stack = set(), list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            continue
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
        stack.extend(ast.iter_child_nodes(node))
    return names


def _rename_locals(tree: ast.Module) -> None:
    module_names, module_globals = _module_names(tree), _module_globals(tree)
    for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
        local = _renamable(fn, module_globals)
        if not local:
            continue
        taken = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name)} | _arg_names(fn) | module_names | RESERVED
        fresh = (n for n in _short_names() if n not in taken)
        mapping = {old: next(fresh) for old in local}
        for node in _own_nodes(fn):
            if isinstance(node, ast.Name) and node.id in mapping:
                node.id = mapping[node.id]
            elif isinstance(node, ast.ExceptHandler) and node.name in mapping:
                node.name = mapping[node.name]


def _module_names(tree: ast.Module) -> set[str]:
    """Every name a module binds or reads anywhere: a renamed local must shadow none of them."""
    names = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Name):
            names.add(n.id)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(n.name)
        elif isinstance(n, ast.alias):
            names.add((n.asname or n.name).split(".")[0])
    return names


def _references(node: ast.AST) -> set[str]:
    """Names, attributes, imported names and words inside strings: anything that could reach a definition."""
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            out.add(n.id)
        elif isinstance(n, ast.Attribute):
            out.add(n.attr)
        elif isinstance(n, ast.alias):
            out.add(n.name.split(".")[-1])
        elif isinstance(n, ast.Constant) and isinstance(n.value, str):
            out.update(_WORD.findall(n.value))
    return out


def _drop_unreferenced(trees: dict[str, ast.Module]) -> None:
    """Remove top-level functions and classes that nothing else names, until none is left."""
    originals = [stmt for tree in trees.values() for stmt in tree.body]  # held, so no id() is reused
    refs = {id(stmt): _references(stmt) for stmt in originals}
    while True:
        counts: dict[str, int] = {}
        for tree in trees.values():
            for stmt in tree.body:
                for name in refs.get(id(stmt), ()):
                    counts[name] = counts.get(name, 0) + 1
        dead = set()
        for tree in trees.values():
            for stmt in tree.body:
                if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                        and not stmt.name.startswith("__"):
                    own = 1 if stmt.name in refs[id(stmt)] else 0  # a recursive call names itself
                    if counts.get(stmt.name, 0) - own <= 0:
                        dead.add(id(stmt))
        if not dead:
            return
        for tree in trees.values():
            tree.body = [s for s in tree.body if id(s) not in dead] or [ast.Pass()]


def _one_space_indent(text: str) -> str:
    # ast.unparse writes every string on one line (newlines escaped), so leading spaces are only indentation.
    lines = []
    for line in text.split("\n"):
        body = line.lstrip(" ")
        lines.append(" " * ((len(line) - len(body)) // 4) + body)
    return "\n".join(lines)


def minify_source(source: str) -> str:
    """One module on its own (no cross-module dead-code removal)."""
    return minify_modules({"m": source})["m"]


def minify_modules(sources: dict[str, str], drop_unreferenced: bool = True) -> dict[str, str]:
    trees = {key: _Strip().visit(ast.parse(src)) for key, src in sources.items()}
    if drop_unreferenced:
        _drop_unreferenced(trees)
    out = {}
    for key, tree in trees.items():
        _rename_locals(tree)
        plain = ast.unparse(tree)
        small = _one_space_indent(plain)
        assert ast.dump(ast.parse(small)) == ast.dump(ast.parse(plain)), f"{key}: re-indenting changed the code"
        out[key] = small + "\n" if small else ""
    return out
