"""Typed YAML for dataclass trees: reading, dotted overrides, type checks and provenance, with one-line errors.

Nothing here knows about metric learning; :mod:`recallk.config` declares the fields and the cross-field checks.
A field is declared with :func:`key` (its default and its meaning, printed by ``recallk config --explain``); a
``str`` field annotated ``Annotated[str, Names(registry, ...)]`` accepts only the registries' names. Every
problem raises :class:`~recallk.errors.ConfigError` naming the key, where the value came from (file or override),
what is allowed and, when a close one exists, a suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
from collections.abc import Hashable, Mapping
from dataclasses import field
from pathlib import PurePath
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from recallk.errors import ConfigError
from recallk.registry import Registry, unknown_name_message


class Names:
    """Field metadata: the value must be a name in one of ``registries`` (``Annotated[str, Names(...)]``)."""

    def __init__(self, *registries: Registry) -> None:
        self.registries = registries

    def allowed(self) -> list[str]:
        return [name for registry in self.registries for name in registry]


def key(default: Any = dataclasses.MISSING, help: str = "", factory: Any = dataclasses.MISSING) -> Any:  # noqa: A002
    """A config field whose meaning is ``metadata["help"]`` (printed by ``recallk config --explain``)."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})



# ---------------------------------------------------------------------------------------------------------------------
# YAML reading


class _YamlLoader(yaml.SafeLoader):
    """Safe loader that reads ``1e-5`` as a float (YAML 1.1 needs a dot) and rejects duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # SafeLoader reports unhashable keys itself
            if key in seen:
                mark = key_node.start_mark
                raise ConfigError(
                    f"duplicate key {key!r} in {mark.name} at line {mark.line + 1}, column {mark.column + 1}; "
                    "keep only one of them"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str, name: str) -> Any:
    loader = _YamlLoader(text)
    loader.name = name  # marks in errors name the file
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{name} at line {mark.line + 1}, column {mark.column + 1}" if mark else name
        problem = " ".join(str(err.problem or err.context or "invalid syntax").split())
        raise ConfigError(
            f"malformed YAML in {where}: {problem}; fix the syntax there "
            "(indentation, a ':' after each key, matching quotes and brackets)"
        ) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"malformed YAML in {name}: {' '.join(str(err).split())}; fix the syntax") from None
    finally:
        loader.dispose()


# ---------------------------------------------------------------------------------------------------------------------
# Building and type checking


class Provenance:
    """Where each value came from (the file, or the override that set it), to say 'where' in error messages."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.overrides: dict[str, str] = {}

    def where(self, *keys: str) -> str:
        for key in keys:
            for over_key, text in self.overrides.items():
                if key == over_key or key.startswith(over_key + ".") or over_key.startswith(key + "."):
                    return f"in override '{text}'"
        return f"in {self.path}" if self.path else "in the configuration"


def field_paths(cls: type, prefix: str = "") -> list[str]:
    """All dotted field names of a config dataclass, e.g. ``['name', ..., 'data.dataset', ...]``."""
    paths = []
    hints = get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            paths.extend(field_paths(hints[f.name], f"{prefix}{f.name}."))
        else:
            paths.append(prefix + f.name)
    return paths


def _unknown_key_error(key: Any, prefix: str, cls: type, sources: Provenance, root: type) -> ConfigError:
    dotted = f"{prefix}{key}"
    allowed = [f.name for f in dataclasses.fields(cls)]
    hint = ""
    close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
    elsewhere = [p for p in field_paths(root) if p.rsplit(".", 1)[-1] == str(key) and p != dotted]
    if close:
        hint = f"did you mean '{prefix}{close[0]}'? "
    elif elsewhere:
        hint = f"did you mean '{elsewhere[0]}'? "
    section = f"'{prefix[:-1]}'" if prefix else "the top level"
    return ConfigError(
        f"unknown key '{dotted}' {sources.where(dotted)}; {hint}allowed keys in {section}: {', '.join(allowed)}"
    )


def _describe(annotation: Any) -> str:
    """Human description of a field type, e.g. ``a list of integers``."""
    origin = get_origin(annotation)
    if origin is Annotated:
        names = _names_of(annotation)
        if names is not None:
            return "one of " + ", ".join(repr(n) for n in names.allowed())
        return _describe(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        parts = [_describe(a) for a in get_args(annotation) if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in get_args(annotation) else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(annotation))
    if origin is tuple:
        item = get_args(annotation)[0]
        if _names_of(item) is not None:
            return "a list, each item " + _describe(item)
        return f"a list of {_describe(item).removeprefix('an ').removeprefix('a ')}s"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", Any: "any value"}.get(
        annotation, str(annotation)
    )


def _names_of(annotation: Any) -> Names | None:
    return next((m for m in get_args(annotation)[1:] if isinstance(m, Names)), None)


def _coerce(value: Any, annotation: Any, key: str, sources: Provenance) -> Any:  # noqa: C901 - one branch per type
    """Check ``value`` against a field annotation and return it in canonical form (tuples, floats)."""
    origin = get_origin(annotation)
    if annotation is Any:
        return value
    if origin is Annotated:
        names = _names_of(annotation)
        value = _coerce(value, get_args(annotation)[0], key, sources)
        if names is not None and value not in names.allowed():
            kind = names.registries[0].kind
            raise ConfigError(unknown_name_message(value, kind, key, names.allowed(), sources.where(key)))
        return value
    if origin in (Union, types.UnionType):
        options = get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, sources)
            except ConfigError:
                continue
    elif origin is Literal:
        allowed = get_args(annotation)
        if isinstance(value, str) and value in allowed:
            return value
        raise ConfigError(
            f"invalid value {value!r} for '{key}' {sources.where(key)}; "
            f"allowed values: {', '.join(repr(a) for a in allowed)}"
        )
    elif origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        item_type = get_args(annotation)[0]
        if value is not None:
            try:
                return tuple(_coerce(item, item_type, key, sources) for item in items)
            except ConfigError:
                if _names_of(item_type) is not None:
                    raise  # a list of names: the unknown name's own message (closest name, allowed ones)
    elif origin is dict:
        if value is None:
            return {}
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
    elif annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, PurePath):  # a model location or data directory given as a pathlib.Path
            return str(value)
    else:  # pragma: no cover - a field type this module does not know is a programming error
        raise TypeError(f"unsupported config field type {annotation!r} for {key}")
    raise ConfigError(
        f"wrong type for '{key}' {sources.where(key)}: expected {_describe(annotation)}, "
        f"got {value!r} ({type(value).__name__}); change the value to {_describe(annotation)}"
    )


def build(cls: type, raw: Any, sources: Provenance) -> Any:
    """Validate a raw mapping against dataclass ``cls`` (recursively) and construct it."""
    return _build(cls, raw, "", sources, cls)


def _build(cls: type, raw: Any, prefix: str, sources: Provenance, root: type) -> Any:
    """Validate a raw mapping against dataclass ``cls`` (recursively) and construct it."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        what = f"section '{prefix[:-1]}'" if prefix else "the top level"
        raise ConfigError(
            f"{what} {sources.where(prefix[:-1]) if prefix else sources.where()} must be a mapping of keys, "
            f"got {raw!r} ({type(raw).__name__}); write it as indented 'key: value' lines"
        )
    hints = get_type_hints(cls, include_extras=True)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise _unknown_key_error(key, prefix, cls, sources, root)
    kwargs = {}
    for name in names & raw.keys():
        dotted = prefix + name
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], raw[name], dotted + ".", sources, root)
        else:
            kwargs[name] = _coerce(raw[name], hints[name], dotted, sources)
    return cls(**kwargs)



def parse_override(text: str) -> tuple[str, Any]:
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key):
        raise ConfigError(
            f"cannot read override {text!r}; write overrides as dotted.key=value, e.g. optim.lr=1e-5"
        )
    try:
        value = parse_yaml(value_text, f"override '{text}'")
    except ConfigError:
        raise ConfigError(
            f"cannot parse the value of override {text!r} as YAML; quote strings and write lists as [1, 2, 4]"
        ) from None
    return key, value


def set_dotted(raw: dict[str, Any], key: str, value: Any, text: str) -> None:
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            parent = ".".join(parts[: i + 1])
            raise ConfigError(
                f"override '{text}' sets a key inside '{parent}', which is a value, not a section; "
                f"set {parent}=... instead"
            )
        node = child
    node[parts[-1]] = value



def deep_copy_mapping(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: deep_copy_mapping(v) if isinstance(v, Mapping) else v for k, v in raw.items()}



def explain_fields(cls: type, prefix: str, title: str, only: str | None = None) -> str:
    """``[section] title``, then two lines per key of the dataclass ``cls`` (``only``: that key alone): the dotted
    key, its type and default, and its meaning."""
    hints = get_type_hints(cls, include_extras=True)
    lines = [f"[{prefix[:-1] or 'top'}] {title}"]
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]) or only not in (None, f.name):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = yaml.safe_dump(list(default) if isinstance(default, tuple) else default,
                               default_flow_style=True).strip().removesuffix("...").strip()
        lines.append(f"  {prefix}{f.name}: {_describe(hints[f.name])} (default: {shown})")
        lines.append(f"      {f.metadata.get('help', '')}")
    return "\n".join(lines)
