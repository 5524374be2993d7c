"""The configuration reference of every registered ``perpneg-*`` class, read from the source.

The ``Config`` dataclasses of :mod:`threestudio_perpneg.adapters` subclass threestudio's configs, so
importing them needs threestudio. This module parses the adapters' source with :mod:`ast` instead
(nothing is imported): each class registered with ``@threestudio.register("perpneg-...")``, its
``Config`` fields with their defaults and the ``#:`` comments above them, and the ``Config`` it
extends (ours, whose fields it inherits, or threestudio's, which is named). The documentation site
renders :func:`config_reference_markdown` (``docs/hooks.py``).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = [
    "ADAPTERS_DIR",
    "ConfigField",
    "RegisteredConfig",
    "config_reference_markdown",
    "read_registered_configs",
]

#: The folder of the threestudio adapters (the only code that imports threestudio).
ADAPTERS_DIR = Path(__file__).resolve().parents[1] / "adapters"


@dataclass
class ConfigField:
    """One field of a ``Config`` dataclass.

    Args:
        name: the config key.
        annotation: its type annotation, as written.
        default: its default, as Python source (``field(default_factory=...)`` unwrapped).
        doc: the ``#:`` comment lines above it, joined; empty when it has none.
        owner: the registered name (or class) that declared it last.
    """

    name: str
    annotation: str
    default: str
    doc: str
    owner: str


@dataclass
class RegisteredConfig:
    """A registered class and its ``Config``.

    Args:
        name: the registered name (``perpneg-...``).
        class_name: the Python class.
        module: the adapter module, e.g. ``threestudio_perpneg.adapters.guidance``.
        summary: the first paragraph of the class docstring.
        own: fields declared in this class's ``Config``.
        parent: the ``Config`` base as written (e.g. ``PerpNegStableDiffusionGuidance.Config``).
        parent_name: the registered name of the parent when it is one of ours, else None.
        threestudio_parent: the threestudio class whose config is extended (dotted), or None.
        fields: every field, inherited ones of our parents included, in declaration order.
    """

    name: str
    class_name: str
    module: str
    summary: str
    own: List[ConfigField]
    parent: str
    parent_name: Optional[str] = None
    threestudio_parent: Optional[str] = None
    fields: List[ConfigField] = field(default_factory=list)


#: threestudio bases whose configs add no key of their own worth listing (BaseModule's ``weights`` is
#: redeclared where it is used).
KEYLESS_BASES = ("threestudio.utils.base.BaseObject", "threestudio.utils.base.BaseModule")


def _registered_name(node: ast.ClassDef) -> Optional[str]:
    for deco in node.decorator_list:
        if (
            isinstance(deco, ast.Call)
            and isinstance(deco.func, ast.Attribute)
            and deco.func.attr == "register"
            and deco.args
            and isinstance(deco.args[0], ast.Constant)
        ):
            return str(deco.args[0].value)
    return None


def _default_source(value: Optional[ast.expr], constants: Dict[str, str], source: str) -> str:
    """The default as source text; ``field(default_factory=f)`` as what ``f()`` returns."""
    if value is None:
        return "(required)"
    if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "field":
        for kw in value.keywords:
            if kw.arg == "default":
                return _default_source(kw.value, constants, source)
            if kw.arg == "default_factory":
                factory = kw.value
                if isinstance(factory, ast.Lambda):
                    return ast.get_source_segment(source, factory.body) or "?"
                name = getattr(factory, "id", "")
                return {"dict": "{}", "list": "[]", "tuple": "()"}.get(name, f"{name}()")
    if isinstance(value, ast.Name) and value.id in constants:
        return constants[value.id]
    return ast.get_source_segment(source, value) or "?"


def _field_doc(lines: Sequence[str], lineno: int) -> str:
    """The contiguous ``#:`` comment lines right above line ``lineno`` (1-based), joined."""
    doc: List[str] = []
    i = lineno - 2
    while i >= 0 and lines[i].strip().startswith("#:"):
        doc.insert(0, lines[i].strip()[2:].strip())
        i -= 1
    return " ".join(doc)


def _threestudio_imports(tree: ast.Module) -> Dict[str, str]:
    """Names imported from threestudio -> their dotted path."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("threestudio"):
            for alias in node.names:
                out[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return out


def _read_module(path: Path) -> List[Tuple[RegisteredConfig, str]]:
    """The registered classes of one adapter module, with their parent class names (unresolved)."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    tree = ast.parse(source)
    constants = {
        target.id: ast.get_source_segment(source, node.value) or "?"
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    imports = _threestudio_imports(tree)
    found = []
    for node in tree.body:
        name = _registered_name(node) if isinstance(node, ast.ClassDef) else None
        if not isinstance(node, ast.ClassDef) or name is None:
            continue
        config = next(
            (b for b in node.body if isinstance(b, ast.ClassDef) and b.name == "Config"), None
        )
        if config is None:
            continue
        own = [
            ConfigField(
                name=stmt.target.id,
                annotation=ast.get_source_segment(source, stmt.annotation) or "",
                default=_default_source(stmt.value, constants, source),
                doc=_field_doc(lines, stmt.lineno),
                owner=name,
            )
            for stmt in config.body
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
        ]
        base = ast.get_source_segment(source, config.bases[0]) if config.bases else ""
        base_class = (base or "").split(".")[0]
        doc = ast.get_docstring(node) or ""
        entry = RegisteredConfig(
            name=name,
            class_name=node.name,
            module=f"threestudio_perpneg.adapters.{path.stem}",
            summary=doc.split("\n\n")[0].replace("\n", " ").strip(),
            own=own,
            parent=base or "",
            threestudio_parent=imports.get(base_class),
        )
        found.append((entry, base_class))
    return found


def read_registered_configs(adapters_dir: Path = ADAPTERS_DIR) -> List[RegisteredConfig]:
    """Every registered ``perpneg-*`` class of ``adapters_dir`` with its ``Config`` fields.

    Returns:
        One :class:`RegisteredConfig` per registered class, sorted by registered name; ``fields``
        holds the inherited fields of our own parents too (a redeclared field keeps the parent's
        doc when it has none of its own).
    """
    entries: List[Tuple[RegisteredConfig, str]] = []
    for path in sorted(Path(adapters_dir).glob("*.py")):
        entries.extend(_read_module(path))
    by_class = {entry.class_name: entry for entry, _ in entries}
    parents = {entry.class_name: base for entry, base in entries}

    def resolve(entry: RegisteredConfig) -> List[ConfigField]:
        if entry.fields:
            return entry.fields
        base = by_class.get(parents[entry.class_name])
        merged: Dict[str, ConfigField] = {}
        if base is not None:
            entry.parent_name = base.name
            entry.threestudio_parent = base.threestudio_parent
            merged = {f.name: f for f in resolve(base)}
        for own in entry.own:
            inherited = merged.get(own.name)
            if inherited is not None and not own.doc:
                own = ConfigField(own.name, own.annotation, own.default, inherited.doc, own.owner)
            merged[own.name] = own
        entry.fields = list(merged.values())
        return entry.fields

    for entry, _ in entries:
        resolve(entry)
    return sorted((entry for entry, _ in entries), key=lambda e: e.name)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def config_reference_markdown(adapters_dir: Path = ADAPTERS_DIR, heading: str = "##") -> str:
    """Markdown: a section per registered class, a table of its keys (default, doc)."""
    out: List[str] = []
    for entry in read_registered_configs(adapters_dir):
        out += [f"{heading} `{entry.name}`", ""]
        if entry.summary:
            out += [entry.summary, ""]
        out.append(f"Class `{entry.module}.{entry.class_name}`.")
        if entry.parent_name:
            out.append(
                f"Every key of `{entry.parent_name}`; the keys it adds or redeclares are in bold."
            )
        if entry.threestudio_parent and entry.threestudio_parent not in KEYLESS_BASES:
            out.append(
                f"Also takes every key of threestudio's `{entry.threestudio_parent}` config, "
                "with threestudio's meaning and default (not listed here)."
            )
        out += ["", "| key | type | default | meaning |", "|---|---|---|---|"]
        own = {f.name for f in entry.own} if entry.parent_name else set()
        for f in entry.fields:
            key = f"**`{f.name}`**" if f.name in own else f"`{f.name}`"
            out.append(
                f"| {key} | `{_cell(f.annotation)}` | `{_cell(f.default)}` | "
                f"{_cell(f.doc) or '(undocumented)'} |"
            )
        out.append("")
    return "\n".join(out)
