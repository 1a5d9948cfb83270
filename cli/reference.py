"""The configuration reference (docs/config.md) and the component descriptions that
`byzps components` prints, both generated from the code.

Why generated: a hand-written reference is wrong the day someone adds a key or a parameter. Here
every fact comes from where the code keeps it: a config key's type and default from the
dataclasses of byzps.common.config, its meaning from the `#:` comment above the field, its
constraints from the `_require` checks of `validate`, a component's parameters from its
constructor (byzps.common.registry) and its one-line doc from its docstring. tests/test_docs.py
regenerates the reference and fails while the committed file differs.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap
import typing
from collections.abc import Iterator
from typing import Any

from byzps.common import config as config_module
from byzps.common.catalog import registries
from byzps.common.config import RunConfig
from byzps.common.registry import REQUIRED, Registry

#: The command that regenerates docs/config.md (also named in the file and in the stale test).
REGENERATE = "byzps components --markdown > docs/config.md"

#: Per kind of component: the config key that names one, and where its parameters go.
KINDS: dict[str, tuple[str, str]] = {
    "algorithms": (
        "algorithm.name",
        "Parameters go in `algorithm.params`, except `eta`: the `algorithm.eta` key is passed to "
        "every estimator that takes one and overrides `params.eta`.",
    ),
    "compressors": (
        "compressor.name",
        "Set through the `[compressor]` keys `k`, `ratio` and (Top-k) `scope`; every other "
        "parameter (`levels`, `values`) goes in `compressor.params`.",
    ),
    "aggregators": (
        "aggregator.name",
        "Parameters go in `aggregator.params`. `f` is `cluster.byzantine`.",
    ),
    "wrappers": (
        "aggregator.pre",
        "Listed in `aggregator.pre`, outermost first. Their parameters also go in "
        "`aggregator.params`: each key goes to the wrapper whose constructor takes it.",
    ),
    "attacks": ("attack.name", "Parameters go in `attack.params`."),
    "tasks": (
        "task.name",
        "Parameters go in `task.params`. `regularizer` and `lam` are also `[task]` keys, which "
        "apply to the tasks that take them (`params` wins over them).",
    ),
}


# ----------------------------------------------------------------------------------------------
# What the code says about the config
# ----------------------------------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """The `#:` comment above each field of dataclass `cls`, joined into one line.

    Raises ValueError for an undocumented field: the reference must describe every key.
    """
    lines, _ = inspect.getsourcelines(cls)
    tree = ast.parse(textwrap.dedent("".join(lines)))
    body = tree.body[0]
    assert isinstance(body, ast.ClassDef)
    docs: dict[str, str] = {}
    for node in body.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        comment: list[str] = []
        i = node.lineno - 2  # the line above the field, 0-based
        while i >= 0 and lines[i].strip().startswith("#:"):
            comment.insert(0, lines[i].strip()[2:].strip())
            i -= 1
        docs[node.target.id] = " ".join(comment)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    if missing:
        raise ValueError(f"{cls.__name__}.{missing[0]} has no `#:` comment in common/config.py")
    return docs


class _Spell(ast.NodeTransformer):
    """Rewrites a condition of `validate` in config keys: local aliases (`n`, `c`) become what
    they stand for, and `config.cluster.workers` becomes `cluster.workers`."""

    def __init__(self, aliases: dict[str, ast.expr]) -> None:
        self.aliases = aliases

    def visit_Name(self, node: ast.Name) -> ast.AST:
        alias = self.aliases.get(node.id)
        return self.visit(alias) if alias is not None else node

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        node = typing.cast(ast.Attribute, self.generic_visit(node))
        path = ast.unparse(node)
        if path.startswith("config."):
            return ast.Name(id=path.removeprefix("config."))
        return node


def _negate(test: ast.expr) -> ast.expr:
    """`a == b` → `a != b` (and back); anything else → `not (…)`."""
    flip = {ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In}
    if isinstance(test, ast.Compare) and len(test.ops) == 1 and type(test.ops[0]) in flip:
        return ast.Compare(test.left, [flip[type(test.ops[0])]()], test.comparators)
    return ast.UnaryOp(ast.Not(), test)


def constraints() -> dict[str, list[str]]:
    """Per config key, the checks `validate` makes on it, as Markdown: the condition in config
    keys (with the `if` it sits under) and the error text when it is fixed."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(config_module.validate)))
    function = tree.body[0]
    assert isinstance(function, ast.FunctionDef)
    aliases: dict[str, ast.expr] = {}
    for node in function.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
            if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple):
                pairs = zip(target.elts, value.elts, strict=True)
            else:
                pairs = zip([target], [value], strict=True)
            aliases.update((t.id, v) for t, v in pairs if isinstance(t, ast.Name))
    spell = _Spell(aliases)

    def code(expr: ast.expr) -> str:
        return "`" + ast.unparse(spell.visit(expr)) + "`"

    found: dict[str, list[str]] = {}

    def walk(statements: list[ast.stmt], when: list[ast.expr]) -> None:
        for node in statements:
            if isinstance(node, ast.If):
                walk(node.body, [*when, node.test])
                walk(node.orelse, [*when, _negate(node.test)])
                continue
            call = node.value if isinstance(node, ast.Expr) else None
            if not (isinstance(call, ast.Call) and ast.unparse(call.func) == "_require"):
                continue
            condition, key, message = call.args
            assert isinstance(key, ast.Constant)
            text = code(condition)
            if isinstance(message, ast.Constant):
                text += f" ({message.value})"
            if when:
                text = "when " + " and ".join(code(w) for w in when) + ": " + text
            found.setdefault(key.value, []).append(text)

    walk(function.body, [])
    return found


def _toml_type(hint: Any) -> str:
    """A field's type in TOML words ("integer", "array of strings", "float or unset")."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if type(None) in typing.get_args(hint):
        return " or ".join(_toml_type(a) for a in args) + " or unset"
    origin = typing.get_origin(hint)
    if origin is list:
        return f"array of {_toml_type(args[0])}s"
    if origin is dict:
        return "table"
    words = {int: "integer", float: "float", str: "string", bool: "boolean"}
    return words.get(hint, getattr(hint, "__name__", str(hint)))


def _toml_value(value: Any) -> str:
    """A default as it would be written in TOML (TOML has no null: None is "unset")."""
    if value is REQUIRED:
        return "required"
    if value is None:
        return "unset"
    return "`" + json.dumps(value, ensure_ascii=False) + "`"


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|")


def _prose(text: str) -> str:
    """Docstring text as Markdown prose: emphasis markers escaped outside `code` spans."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("\\", "\\\\").replace("*", "\\*").replace("_", "\\_")
    return "`".join(parts)


def _section_lines(name: str, cls: type, doc: str, checks: dict[str, list[str]]) -> Iterator[str]:
    yield f"### `[{name}]`"
    yield ""
    yield doc
    yield ""
    yield "| key | type | default | meaning |"
    yield "|---|---|---|---|"
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        default = _toml_value(_default(f))
        yield f"| `{f.name}` | {_toml_type(hints[f.name])} | {default} | {_cell(docs[f.name])} |"
    rules = [
        (f"{name}.{f.name}", checks.get(f"{name}.{f.name}", [])) for f in dataclasses.fields(cls)
    ]
    if any(found for _, found in rules):
        yield ""
        yield "Checked when the file is loaded:"
        yield ""
        for key, found in rules:
            for text in found:
                yield f"- `{key}`: {text}"
    yield ""


def _component_lines(registry: Registry, name: str) -> Iterator[str]:
    yield f"#### `{name}`"
    yield ""
    yield f"{_prose(registry.summary(name))} [Details](algorithms.md#{name})."
    yield ""
    params = registry.parameters(name)
    if not params:
        yield "No parameters."
    else:
        yield "| parameter | type | default |"
        yield "|---|---|---|"
        for p in params:
            yield f"| `{p.name}` | {_cell(f'`{p.annotation}`' if p.annotation else '')} | " + (
                _toml_value(p.default) + " |"
            )
    yield ""


def config_reference() -> str:
    """The whole of docs/config.md."""
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated by `{REGENERATE}` from common/config.py and the component registries."
        " Do not edit: tests/test_docs.py fails while this file differs from the output. -->",
        "",
        "A run is one TOML file with the sections below. Every section and key is optional and "
        "takes its default when missing; `--set section.key=value` overrides any key from the "
        "command line (the value is parsed as TOML). An unknown key, a wrong type or an "
        "impossible combination is refused with an error that names the key. The component "
        "names and their parameters are then checked against the registries: an unknown "
        "parameter is refused with the list of those the component takes.",
        "",
        "What each component computes, and where it comes from: [algorithms.md](algorithms.md). "
        "`byzps components --verbose` prints the component part of this page; "
        "`byzps components NAME` prints one component.",
        "",
        "## Sections",
        "",
    ]
    checks = constraints()
    section_docs = field_docs(RunConfig)
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        lines += _section_lines(f.name, hints[f.name], section_docs[f.name], checks)
    lines += ["## Components", ""]
    for kind, registry in registries().items():
        if kind not in KINDS:
            raise ValueError(f"cli/reference.py: KINDS has no entry for the new kind {kind!r}")
        key, where = KINDS[kind]
        lines += [f"### {kind.capitalize()} (`{key}`)", "", where]
        if registry.supplied:
            supplied = ", ".join(f"`{s}`" for s in sorted(registry.supplied))
            lines += ["", f"Supplied by byzps, never set in a config: {supplied}."]
        lines.append("")
        for name in registry.names():
            lines += _component_lines(registry, name)
    return "\n".join(lines).rstrip("\n") + "\n"


# ----------------------------------------------------------------------------------------------
# Plain text for `byzps components`
# ----------------------------------------------------------------------------------------------


def component_text(registry: Registry, name: str, indent: str = "") -> list[str]:
    """`name`'s one-line doc and its parameters with their defaults, as lines of plain text."""
    lines = [f"{indent}{registry.summary(name)}"]
    params = registry.parameters(name)
    if not params:
        return [*lines, f"{indent}(no parameters)"]
    return lines + [f"{indent}  {p.describe()}" for p in params]


def find(name: str) -> list[tuple[str, Registry]]:
    """Every (kind, registry) that registers `name` (usually one)."""
    return [(kind, r) for kind, r in registries().items() if name in r.names()]
