"""The machinery under :mod:`rl.config`: declared fields, a validator, YAML in and out.

A config section is a frozen dataclass whose fields are declared with :func:`knob` (a leaf:
default, docstring, and a range, a set of choices, a pattern or a worded ``allowed``) or
:func:`section` (a nested section). :func:`build` turns a nested dict (as read from YAML) into
the dataclass tree, collecting every problem as an :class:`Issue` (dotted key, value, what is
wrong, what is allowed, where the value came from) and raising them together as one
:class:`ConfigError`. Nothing is coerced except an int given for a float field, which is the
same number.

YAML is read with YAML 1.2 scalar rules rather than PyYAML's 1.1 defaults: ``5e-6`` is a float
(1.1 reads it as a string), ``on``/``off``/``yes``/``no`` are strings (1.1 reads booleans), and
``010`` is ten (1.1 reads octal). The dumper uses the same rules, so a dump always loads back
to the same values. Duplicate keys in a mapping are an error, not "the last one wins".
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import yaml

__all__ = [
    "ConfigError", "Issue", "knob", "section", "Spec", "specs", "build", "to_dict",
    "describe_table", "section_items", "yaml_load", "yaml_dump", "key_lines", "read_yaml", "parse_override",
    "set_dotted",
]


@dataclass(frozen=True)
class Issue:
    """One problem: ``key`` (dotted), the offending ``value``, the ``problem``, what is
    ``allowed`` and the ``source`` of the value (``file:line``, ``--set a.b=c`` or ``default``)."""

    key: str
    value: Any
    problem: str
    allowed: str
    source: str = "default"

    def __str__(self) -> str:
        return f"{self.source}: {self.key} = {self.value!r}: {self.problem}; allowed: {self.allowed}"


class ConfigError(ValueError):
    """Invalid config; ``issues`` lists every problem found, the message names each one."""

    def __init__(self, issues: list[Issue] | Issue):
        self.issues = [issues] if isinstance(issues, Issue) else list(issues)
        lines = [str(i) for i in self.issues]
        head = "invalid config" if len(lines) == 1 else f"invalid config ({len(lines)} problems)"
        super().__init__(head + ":\n  " + "\n  ".join(lines))


# --------------------------------------------------------------------------- declaring fields
_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def knob(default: Any, doc: str, *, ge=None, gt=None, le=None, lt=None, choices: tuple | None = None,
         pattern: str | None = None, min_items: int | None = None, allowed: str | None = None) -> Any:
    """A leaf field: default, one-line-or-more docstring, and what values are allowed.

    Numbers take bounds (``ge``/``gt``/``le``/``lt``); anything may take ``choices``; strings a
    full-match regex ``pattern``; lists ``min_items``. ``allowed`` words the rule in the
    reference table when the bounds alone do not say it (e.g. "a path"); a field with none of
    these (bools excepted) is a declaration error, so every knob documents its range.
    """
    meta = {"doc": doc.strip(), "bounds": {k: v for k, v in
                                           dict(ge=ge, gt=gt, le=le, lt=lt).items() if v is not None},
            "choices": choices, "pattern": pattern, "min_items": min_items, "allowed": allowed}
    if not meta["doc"]:
        raise TypeError("every knob needs a docstring")
    if isinstance(default, list):
        raise TypeError("use a tuple default; sections are frozen")
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type) -> Any:
    """A nested section; its doc is the first paragraph of the class docstring."""
    doc = (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    return dataclasses.field(default_factory=cls, metadata={"doc": doc, "section": cls})


@dataclass(frozen=True)
class Spec:
    """A field as the validator and the reference table see it."""

    name: str
    type: Any
    default: Any
    doc: str
    bounds: dict
    choices: tuple | None
    pattern: str | None
    min_items: int | None
    allowed_text: str | None
    section: type | None

    @property
    def optional(self) -> bool:
        return _is_union(self.type) and type(None) in typing.get_args(self.type)

    @property
    def base(self) -> Any:
        """The type without ``None``; a union of two non-None types stays a union."""
        if not _is_union(self.type):
            return self.type
        rest = tuple(a for a in typing.get_args(self.type) if a is not type(None))
        return rest[0] if len(rest) == 1 else Union[rest]  # type: ignore[valid-type]

    def type_name(self) -> str:
        name = _type_name(self.base)
        return f"{name} | null" if self.optional else name

    def allowed(self) -> str:
        if self.section is not None:
            return f"a mapping with keys: {', '.join(s.name for s in specs(self.section))}"
        if self.choices is not None:
            text = "one of: " + ", ".join(_show(c) for c in self.choices)
        elif self.allowed_text:
            text = self.allowed_text
        elif self.bounds:
            text = f"{'an' if self.base is int else 'a'} {_type_name(self.base)} {_interval(self.bounds)}"
        elif self.pattern:
            text = f"a string matching {self.pattern}"
        elif self.base is bool:
            text = "true or false"
        else:
            text = ""
        if self.min_items:
            text += f" (at least {self.min_items})"
        return f"{text}, or null" if self.optional and text else text


def _interval(b: dict) -> str:
    """``{"ge": 0, "lt": 1}`` -> ``in [0, 1)``; one-sided bounds read ``>= 1``."""
    low = ("[", b["ge"]) if "ge" in b else ("(", b["gt"]) if "gt" in b else None
    high = (b["le"], "]") if "le" in b else (b["lt"], ")") if "lt" in b else None
    if low and high:
        return f"in {low[0]}{_show(low[1])}, {_show(high[0])}{high[1]}"
    return " ".join(f"{_BOUNDS[k]} {_show(v)}" for k, v in b.items())


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def _show(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, tuple):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def specs(cls: type) -> list[Spec]:
    """The fields of a section class, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        m = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else None
        out.append(Spec(f.name, hints[f.name], default, m.get("doc", ""), m.get("bounds", {}),
                        m.get("choices"), m.get("pattern"), m.get("min_items"), m.get("allowed"),
                        m.get("section")))
    return out


# --------------------------------------------------------------------------- validating
def _check_scalar(tp: Any, value: Any) -> tuple[Any, str | None]:
    """(value, None) when ``value`` fits type ``tp`` (an int for a float becomes a float),
    else (value, what is wrong)."""
    if _is_union(tp):
        for arm in typing.get_args(tp):
            out, err = _check_scalar(arm, value)
            if err is None:
                return out, None
        return value, f"expected {_type_name(tp)}, got {type(value).__name__}"
    if typing.get_origin(tp) is tuple:
        if not isinstance(value, (list, tuple)):
            return value, f"expected a list, got {type(value).__name__}"
        items = []
        for i, item in enumerate(value):
            out, err = _check_scalar(typing.get_args(tp)[0], item)
            if err:
                return value, f"item {i}: {err}"
            items.append(out)
        return tuple(items), None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        hint = " (quote it to make it a string)" if tp is str and value is not None else ""
        return value, f"expected {_type_name(tp)}, got {type(value).__name__}{hint}"
    if tp is float and not math.isfinite(value):
        return value, "not a finite number"
    if tp is str and not value:
        return value, "empty string (use null for none)"
    return value, None


def _check_leaf(spec: Spec, value: Any) -> tuple[Any, str | None]:
    if value is None:
        return None, None if spec.optional else "null is not allowed here"
    value, err = _check_scalar(spec.base, value)
    if err:
        return value, err
    if spec.choices is not None and value not in spec.choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in spec.choices], n=1)
        return value, "not one of the choices" + (f"; did you mean {close[0]!r}?" if close else "")
    for bound, limit in spec.bounds.items():
        ok = {"ge": value >= limit, "gt": value > limit, "le": value <= limit, "lt": value < limit}[bound]
        if not ok:
            return value, "out of range"
    if spec.pattern and isinstance(value, str) and not re.fullmatch(spec.pattern, value):
        return value, f"does not match {spec.pattern}"
    if spec.min_items and isinstance(value, tuple) and len(value) < spec.min_items:
        return value, f"needs at least {spec.min_items} item(s)"
    return value, None


REMOVED_KEYS = {
    "algorithm.num_minibatches": (1, "nothing read it; a step makes one optimizer update from its whole batch",
                                  "delete the key (several updates per batch are not implemented)"),
    "model.cache_dir": (None, "nothing read it", "set $API_ADAPTER_CACHE to move the embedded model's cache"),
}
"""Keys an older config may carry: ``key: (value, why, instead)``. The value the code has always
used (what older resolved run configs hold) is accepted; any other is an error naming why."""


def build(cls: type, raw: Any, sources: dict[str, str], prefix: str = "") -> tuple[Any, list[Issue]]:
    """Build section ``cls`` from ``raw`` (a mapping, or None for all defaults).

    ``sources`` maps dotted keys to where their value came from. Returns (instance or None,
    issues); the instance is None when there were issues.
    """
    where = lambda key: sources.get(key, "default")  # noqa: E731
    if raw is None:
        raw = {}
    own = specs(cls)
    if not isinstance(raw, dict):
        key = prefix.rstrip(".") or "<root>"
        return None, [Issue(key, raw, f"expected a mapping, got {type(raw).__name__}",
                            f"a mapping with keys: {', '.join(s.name for s in own)}", where(key))]
    names = [s.name for s in own]
    issues: list[Issue] = []
    for key in raw:
        full = f"{prefix}{key}"
        if full in REMOVED_KEYS:
            harmless, why, instead = REMOVED_KEYS[full]
            if raw[key] != harmless:  # an older resolved config carries the old default: what runs now
                issues.append(Issue(full, raw[key], f"removed: {why}", instead, where(full)))
        elif key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f"unknown key; did you mean {close[0]!r}?" if close else "unknown key"
            issues.append(Issue(full, raw[key], hint,
                                f"keys of {prefix.rstrip('.') or 'the top level'}: {', '.join(names)}",
                                where(full)))
    values = {}
    for spec in own:
        full = f"{prefix}{spec.name}"
        if spec.section is not None:
            values[spec.name], sub = build(spec.section, raw.get(spec.name), sources, full + ".")
            issues += sub
        elif spec.name in raw and section_items(spec) is not None:
            values[spec.name], sub = _build_items(spec, raw[spec.name], sources, full)
            issues += sub
        elif spec.name in raw:
            values[spec.name], err = _check_leaf(spec, raw[spec.name])
            if err:
                issues.append(Issue(full, raw[spec.name], err, spec.allowed(), where(full)))
    return (None, issues) if issues else (cls(**values), [])


def section_items(spec: Spec) -> type | None:
    """The section class of a list-of-sections field (``tuple[Stage, ...]``), else None."""
    if typing.get_origin(spec.base) is tuple:
        arg = typing.get_args(spec.base)[0]
        return arg if dataclasses.is_dataclass(arg) else None
    return None


def _build_items(spec: Spec, raw: Any, sources: dict[str, str], key: str) -> tuple[Any, list[Issue]]:
    """A list of sections: each item built like a section, its keys named ``key[i].field``."""
    if not isinstance(raw, (list, tuple)):
        return None, [Issue(key, raw, f"expected a list, got {type(raw).__name__}", spec.allowed(),
                            sources.get(key, "default"))]
    built, issues = [], []
    for i, item in enumerate(raw):
        value, sub = build(section_items(spec), item, sources, f"{key}[{i}].")
        built.append(value)
        issues += sub
    return tuple(built), issues


def to_dict(obj: Any) -> dict:
    """A section tree as plain nested dicts (tuples become lists), ready for YAML or JSON."""
    plain = lambda v: to_dict(v) if dataclasses.is_dataclass(v) else v  # noqa: E731
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        out[f.name] = plain(v) if not isinstance(v, tuple) else [plain(x) for x in v]
    return out


def describe_table(cls: type, prefix: str) -> str:
    """A markdown table of the section's leaves: key, type, default, allowed, doc."""
    cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    rows = ["| key | type | default | allowed | doc |", "|---|---|---|---|---|"]
    for s in specs(cls):
        if s.section is None:
            rows.append(f"| `{prefix}{s.name}` | {cell(s.type_name())} | `{cell(_show(s.default))}` "
                        f"| {cell(s.allowed())} | {cell(s.doc)} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------- YAML
_INT = re.compile(r"^[-+]?[0-9]+$")
_FLOAT = re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")


def _core_resolvers(cls: type) -> None:
    """Swap PyYAML's YAML 1.1 implicit bool/int/float rules for YAML 1.2 core ones."""
    table = {ch: [(tag, rx) for tag, rx in lst if tag.rsplit(":", 1)[-1] not in ("bool", "int", "float")]
             for ch, lst in cls.yaml_implicit_resolvers.items()}
    cls.yaml_implicit_resolvers = table
    cls.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL, list("tTfF"))
    cls.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
    cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


class _Loader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key]})", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    pass


_core_resolvers(_Loader)
_core_resolvers(_Dumper)
_Loader.add_constructor("tag:yaml.org,2002:int", lambda loader, node: int(loader.construct_scalar(node)))


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 -- a SafeLoader subclass


def yaml_dump(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False)


def key_lines(text: str, path: str) -> dict[str, str]:
    """Map every dotted key in a YAML document to ``"path:line"`` of that key."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode):
                    out[prefix + k.value] = f"{path}:{k.start_mark.line + 1}"
                    walk(v, prefix + k.value + ".")
        elif isinstance(node, yaml.SequenceNode):  # a list of sections: keys like curriculum[1].lr
            for i, item in enumerate(node.value):
                out[f"{prefix.rstrip('.')}[{i}]"] = f"{path}:{item.start_mark.line + 1}"
                walk(item, f"{prefix.rstrip('.')}[{i}].")

    walk(yaml.compose(text, Loader=_Loader), "")
    return out


def read_yaml(path: str | Path) -> tuple[Any, dict[str, str]]:
    """(the document, or {} when empty; dotted key -> ``"path:line"``) of a YAML file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:  # missing, a folder, unreadable, not text
        reason = error.strerror if isinstance(error, OSError) and error.strerror else type(error).__name__
        raise ConfigError(Issue("<document>", str(path), f"cannot read the config file: {reason}",
                                "a readable YAML file", str(path))) from None
    try:
        doc = yaml_load(text)
        return ({} if doc is None else doc), {"<root>": str(path), **key_lines(text, str(path))}
    except yaml.YAMLError as e:  # a syntax error or a duplicate key, with its mark
        mark = getattr(e, "problem_mark", None)
        line = text.splitlines()[mark.line].strip() if mark and mark.line < len(text.splitlines()) else ""
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(Issue("<document>", line, f"not valid YAML: {getattr(e, 'problem', e)}",
                                "a YAML mapping of sections", where)) from None


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=c"`` -> ``("a.b", c)`` with c read as a YAML value (``[x, y]``, ``true``, ``null``,
    ``5e-6``, ``'123'`` for a string of digits)."""
    source = f"--set {text}"
    key, sep, rest = text.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+", key):
        problem = "bad override syntax" + ("" if sep else " (no '=')")
        raise ConfigError(Issue(key or text, rest if sep else text, problem,
                                "section.key=value with a dotted key, e.g. learner.lr=1e-5", source))
    if not rest.strip():
        raise ConfigError(Issue(key, rest, "empty value", "a YAML value; write null for none, '' is not allowed",
                                source))
    try:
        value = yaml_load(rest)
    except yaml.YAMLError as e:
        raise ConfigError(Issue(key, rest, f"not a YAML value ({e.problem})", "a YAML scalar or list",
                                source)) from None
    return key, value


def set_dotted(raw: dict, key: str, value: Any, source: str, sources: dict[str, str]) -> None:
    """Set dotted ``key`` in the nested dict ``raw``, creating missing sections (recorded in
    ``sources`` as coming from ``source``); a scalar in the way is an error."""
    *parents, leaf = key.split(".")
    node = raw
    for i, part in enumerate(parents):
        here = ".".join(parents[: i + 1])
        if part not in node:
            node[part] = {}
            sources[here] = source
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(Issue(here, node, "not a section, so it has no keys",
                                    "an override of a leaf: section.key=value", source))
    node[leaf] = value
    sources[key] = source
