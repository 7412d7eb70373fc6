"""Typed configs: YAML files validated against pydantic schemas, with ``--set a.b.c=value`` overrides.

A schema is a frozen pydantic model that forbids unknown keys (:class:`Schema`). Loading merges a
YAML file and overrides, then validates once; every failure becomes one :class:`ConfigError` line
that names where the value came from (file or override), the dotted path, what was expected and
what was found, with the nearest valid spelling for an unknown key.

Example:
    >>> from recsys.schemas import SynthConfig
    >>> cfg = load_config(SynthConfig, overrides=["num_users=300", "click_model.bias=-4.5"])
    >>> (cfg.num_users, cfg.click_model.bias)
    (300, -4.5)
"""

from __future__ import annotations

import datetime as dt
import difflib
import reprlib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from recsys.errors import SHOWN_CHARS, ConfigError, clip

S = TypeVar("S", bound="Schema")
Loc = tuple[str | int, ...]


class Schema(BaseModel):
    """Base of every config section: immutable, unknown keys rejected, defaults validated, and
    no float field (nested or in a list) takes inf or NaN: ``lr: .inf`` is a typo, not a setting."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


# --------------------------------------------------------------------------------------------
# Loading


def load_config(
    schema: type[S],
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> S:
    """Load ``path`` (YAML; optional), apply ``overrides`` and validate against ``schema``.

    Args:
        schema: the :class:`Schema` subclass to validate against.
        path: a YAML file whose top level is a mapping; ``None`` starts from the schema defaults.
        overrides: ``"a.b.c=value"`` strings; the value is parsed as YAML (``3``, ``true``, ``[1, 2]``).

    Returns:
        The validated, frozen config.

    Raises:
        ConfigError: unreadable or malformed file, bad override, unknown key, wrong type or value.
    """
    raw = read_yaml_mapping(path) if path is not None else {}
    parsed = [parse_override(o) for o in overrides]
    for keys, _value, text in parsed:
        check_path(schema, keys, source=f"--set {_text(text)}")
        _assign(raw, keys, _value, source=f"--set {_text(text)}")
    _check_integers(raw, path, parsed)
    try:
        return schema.model_validate(raw)
    except (ValidationError, RecursionError) as exc:
        if isinstance(exc, RecursionError):  # pydantic walks a value nested thousands deep
            raise ConfigError(f"config error in {path or 'the overrides'}: a value is nested too deeply") from None
        raise ConfigError(_describe(schema, exc, path, parsed)) from None


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file whose top level must be a mapping (an empty file is an empty mapping)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {p}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config error in {where}: invalid YAML: {_text(problem)}") from None
    except (ValueError, RecursionError) as exc:  # PyYAML's constructors and recursive composer
        raise ConfigError(f"config error in {p}: invalid YAML: {_yaml_failure(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config error in {p}: the top level must be a mapping of keys to values, "
            f"got {type(data).__name__}"
        )
    return data


def parse_override(text: str) -> tuple[tuple[str, ...], Any, str]:
    """Split ``"a.b.c=value"`` into ``(("a", "b", "c"), value, text)``; the value is YAML.

    Raises:
        ConfigError: no ``=``, an empty key segment, or a value that is not valid YAML.
    """
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"bad override {clip(text)!r}: expected KEY=VALUE, e.g. --set num_users=500")
    keys = tuple(key.split("."))
    if any(not k for k in keys):
        raise ConfigError(f"bad override {clip(text)!r}: empty segment in key {clip(key)!r}")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else None
    except yaml.YAMLError:
        raise ConfigError(
            f"bad override {clip(text)!r}: the value {clip(value_text)!r} is not valid YAML "
            "(quote strings that contain ':' or '#')"
        ) from None
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"bad override {clip(text)!r}: the value is not valid YAML: {_yaml_failure(exc)}") from None
    return keys, value, text


def _text(text: str, limit: int = SHOWN_CHARS) -> str:
    """User text (a key, an override) in a message: control and other unprintable characters
    escaped, so that the message stays one line, and cut to ``limit`` characters."""
    return clip("".join(c if c.isprintable() else repr(c)[1:-1] for c in text), limit)


def _yaml_failure(exc: ValueError | RecursionError) -> str:
    """What PyYAML failed on outside its own error types: a date like 2026-13-01, an integer of
    more than 4,300 digits (Python's limit), or nesting deeper than the interpreter's stack."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return _text(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 200)


def check_path(schema: type[Schema], keys: Sequence[str], *, source: str) -> None:
    """Raise a ConfigError unless ``keys`` names a field of ``schema`` (recursively)."""
    model: type[BaseModel] | None = schema
    for depth, key in enumerate(keys):
        where = _text(".".join(keys[: depth + 1]))
        if model is None:
            parent = _text(".".join(keys[:depth]))
            raise ConfigError(f"config error in {source}: {parent} is a value, not a section, so {where} does not exist")
        fields = model.model_fields
        if key not in fields:
            raise ConfigError(f"config error in {source}: {_unknown_key(key, where, fields)}")
        model = _section_model(fields[key].annotation)


def dump_config(cfg: Schema) -> str:
    """The config as YAML (the resolved form saved beside outputs)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def _assign(raw: dict[str, Any], keys: Sequence[str], value: Any, *, source: str) -> None:
    node = raw
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif not isinstance(child, dict):
            where = _text(".".join(keys[: i + 1]))
            raise ConfigError(f"config error in {source}: {where} holds {_show(child)}, not a section")
        node = child
    node[keys[-1]] = value


# --------------------------------------------------------------------------------------------
# Turning pydantic's errors into one line


def _describe(
    schema: type[Schema],
    exc: ValidationError,
    path: str | Path | None,
    overrides: Sequence[tuple[tuple[str, ...], Any, str]],
) -> str:
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc: Loc = tuple(first["loc"])
    source = str(path) if path is not None else "the defaults"
    exact = [text for keys, _v, text in overrides if loc[: len(keys)] == keys]
    inside = [text for keys, _v, text in overrides if keys[: len(loc)] == loc]
    if exact:  # the value at fault came from an override
        source = f"--set {_text(exact[-1])}"
    elif inside:  # a section-level rule that an override took part in
        source += "".join(f" with --set {_text(text)}" for text in inside)
    message = f"config error in {source}: {_explain(schema, first)}"
    if len(errors) > 1:
        more = len(errors) - 1
        message += f" (and {more} more error{'s' if more > 1 else ''})"
    return message


def explain_first(schema: type[BaseModel], exc: ValidationError) -> str:
    """The first error of validating ``schema`` as one line (``key: what was wrong, got value``),
    for a rule that validates a nested schema itself and must report through a ``ValueError``."""
    return _explain(schema, exc.errors(include_url=False)[0])


def _explain(schema: type[Schema], err: Mapping[str, Any]) -> str:
    loc: Loc = tuple(err["loc"])
    dotted = _text(".".join(str(p) for p in loc)) or "(top level)"
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden":
        parent = _model_at(schema, loc[:-1])
        fields = parent.model_fields if parent is not None else {}
        return _unknown_key(str(loc[-1]), dotted, fields)
    if kind == "missing":
        return f"missing required key {dotted}"
    annotation = _annotation_at(schema, loc)
    if kind in ("value_error", "assertion_error"):
        reason = _text(str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, "))
        return f"{dotted}: {reason}" if loc else reason
    if annotation is not None and kind.endswith(("_type", "_parsing", "_from_float", "literal_error", "enum")):
        return f"{dotted}: expected {_type_name(annotation)}, got {_show(value)}"
    msg = _text(str(err["msg"]))
    return f"{dotted}: {msg[:1].lower()}{msg[1:]}, got {_show(value)}"


def _unknown_key(key: str, dotted: str, fields: Mapping[str, Any]) -> str:
    names = sorted(fields)
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    where = f" at {_text(dotted)}" if _text(dotted) != _text(key) else ""
    if close:
        return f"unknown key {clip(key)!r}{where}; did you mean {close[0]!r}?"
    return f"unknown key {clip(key)!r}{where}; valid keys here: {', '.join(names)}"


# A value is shown, never dumped: a long string, a huge integer or a deep or aliased structure
# (YAML anchors make a tree exponential in its text) must not make the message huge.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple = 3, 4, 4, 4
_REPR.maxstring, _REPR.maxlong, _REPR.maxother = 120, 60, 120


def _show(value: Any) -> str:
    text = _REPR.repr(value)
    if isinstance(value, (dict, list)) and len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


#: Integers a config may hold: numpy and torch take them as int64.
INT_RANGE = (-(2**63), 2**63 - 1)


def _check_integers(
    raw: Any,
    path: str | Path | None,
    overrides: Sequence[tuple[tuple[str, ...], Any, str]],
    where: Loc = (),
    seen: set[int] | None = None,
) -> None:
    """Raise a ConfigError naming the key of the first integer outside :data:`INT_RANGE`."""
    seen = set() if seen is None else seen
    if isinstance(raw, (dict, list)):
        if id(raw) in seen:  # a YAML alias: checked once, not once per reference (exponential)
            return
        seen.add(id(raw))
        items = raw.items() if isinstance(raw, dict) else enumerate(raw)
        for key, value in items:
            _check_integers(value, path, overrides, (*where, key if isinstance(key, int) and isinstance(raw, list)
                                                     else str(key)), seen)
    elif isinstance(raw, int) and not isinstance(raw, bool) and not INT_RANGE[0] <= raw <= INT_RANGE[1]:
        keys = tuple(p for p in where if isinstance(p, str))
        exact = [text for k, _v, text in overrides if keys[: len(k)] == k]
        source = f"--set {_text(exact[-1])}" if exact else str(path)
        dotted = _text(".".join(str(p) for p in where))
        raise ConfigError(f"config error in {source}: {dotted}: {_show(raw)} is out of range: integers must fit "
                          "in 64 bits, [-2**63, 2**63 - 1]")


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The schema class a field holds (also through ``X | None``), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _section_model(arg)
            if found is not None:
                return found
    return None


def _model_at(schema: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    model: type[BaseModel] | None = schema
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        model = _section_model(model.model_fields[part].annotation)
    return model


def _annotation_at(schema: type[BaseModel], loc: Loc) -> Any:
    model: type[BaseModel] | None = schema
    annotation: Any = None
    for part in loc:
        if isinstance(part, int):  # an element of a list field
            args = typing.get_args(annotation)
            annotation = args[0] if args else None
            continue
        if model is None or part not in model.model_fields:
            return annotation
        annotation = model.model_fields[part].annotation
        model = _section_model(annotation)
    return annotation


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        parts = [_type_name(a) for a in typing.get_args(annotation) if a is not type(None)]
        return " or ".join(parts) + (" (or null)" if type(None) in typing.get_args(annotation) else "")
    if origin in (list, tuple, Sequence):
        args = typing.get_args(annotation)
        inner = _type_name(args[0]) if args else "values"
        return f"a list of {inner.removeprefix('an ').removeprefix('a ')}s"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "a section (a mapping of keys to values)"
    names = {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        dt.datetime: "a date-time (ISO 8601, e.g. 2026-01-01T00:00:00Z)",
        dt.date: "a date (e.g. 2026-01-01)",
    }
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))
