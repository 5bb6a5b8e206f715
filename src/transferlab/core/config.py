"""Frozen-dataclass configs: help text per field, `--set key=value` overrides, stable hashing.

Every config in transferlab is a frozen dataclass whose fields carry `metadata={"help": ...}`.
`field(default, help)` is the short way to write one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from typing import Any

from .errors import UserError


def field(default: Any, help: str, **kwargs) -> Any:  # noqa: A002 - mirrors argparse
    """A dataclass field with help text; mutable defaults (lists) become tuples."""
    if isinstance(default, list):
        default = tuple(default)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def config_help(cls) -> list[tuple[str, str, Any]]:
    """(name, help, default) of every field, for docs and `transferlab show NAME`."""
    return [(f.name, f.metadata.get("help", ""), f.default) for f in dataclasses.fields(cls)]


def _coerce(value: str, annotation, key: str):
    """Parse a command-line string into the field's declared type."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing) | {"types": types})  # annotations are our own code
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value.lower() in ("none", "null") and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except UserError:
                continue
        raise UserError(f"--set {key}={value!r}: cannot parse as {annotation}")
    if origin is typing.Literal:
        if value not in args:
            raise UserError(f"--set {key}={value!r}: allowed values are {', '.join(map(str, args))}")
        return value
    if origin in (tuple, list):
        inner = args[0] if args else str
        parts = [p for p in value.split(",") if p != ""]
        return tuple(_coerce(p, inner, key) for p in parts)
    if annotation is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"--set {key}={value!r}: expected a boolean (true/false)")
    if annotation in (int, float):
        try:
            return annotation(value)
        except ValueError:
            raise UserError(f"--set {key}={value!r}: expected {annotation.__name__}") from None
    if annotation is str or annotation is Any:
        return value
    raise UserError(f"--set {key}: fields of type {annotation} cannot be set from the command line")


def parse_overrides(overrides: dict[str, Any] | list[str]) -> dict[str, Any]:
    """A dict of overrides; "key=value" strings keep their value as text, to be parsed by field type."""
    if not isinstance(overrides, list):
        return dict(overrides)
    parsed: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        parsed[k.strip()] = _StrValue(v.strip())
    return parsed


def apply_overrides(cfg, overrides: dict[str, Any] | list[str]):
    """Return a copy of `cfg` with all overrides applied in one step.

    `overrides` is a dict of already-typed values, or a list of "key=value" strings (strings are
    parsed into each field's type). Dotted keys reach nested configs (`method.top_k=2`); a key that
    is not a field of `cfg` but of exactly one nested config is routed there (`top_k=2`).

    Why one step: a config validates itself in `__post_init__`, and fields often constrain each
    other (`n_tasks * classes_per_task <= 10`). Applying keys one at a time would validate half-applied
    configs, so the result would depend on the order of the `--set` flags.
    """
    tree: dict = {}
    for key, value in parse_overrides(overrides).items():
        path = _resolve_path(cfg, key.split("."), key)
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"config key {key!r} conflicts with another override of {part!r}")
        if isinstance(node.get(path[-1]), dict):
            raise UserError(f"config key {key!r} conflicts with overrides of its sub-keys")
        node[path[-1]] = _Leaf(value, key)
    return _rebuild(cfg, tree)


class _StrValue(str):
    """Marks a value that still needs parsing into the field's type."""


@dataclasses.dataclass
class _Leaf:
    value: Any
    key: str


def _nested_fields(cfg) -> list[str]:
    return [f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))]


def _resolve_path(cfg, path: list[str], full_key: str) -> list[str]:
    """The field path a key names, following a flat alias into the one nested config that has it."""
    names = {f.name for f in dataclasses.fields(cfg)}
    head = path[0]
    if head not in names:
        owners = [n for n in _nested_fields(cfg) if head in {f.name for f in dataclasses.fields(getattr(cfg, n))}]
        if len(owners) == 1:
            return [owners[0], *_resolve_path(getattr(cfg, owners[0]), path, full_key)]
        hint = f" (it is a field of {', '.join(owners)}: write {owners[0]}.{full_key})" if owners else ""
        raise UserError(
            f"unknown config key {full_key!r} for {type(cfg).__name__}{hint}; valid keys: {', '.join(sorted(names))}"
        )
    if len(path) == 1:
        return path
    child = getattr(cfg, head)
    if not dataclasses.is_dataclass(child):
        raise UserError(f"config key {full_key!r}: {head!r} has no sub-keys")
    return [head, *_resolve_path(child, path[1:], full_key)]


def _rebuild(cfg, tree: dict):
    """Apply a tree of changes: children first, then one `replace` (one validation) per level."""
    hints = typing.get_type_hints(type(cfg))
    changes = {}
    for name, sub in tree.items():
        if isinstance(sub, dict):
            changes[name] = _rebuild(getattr(cfg, name), sub)
            continue
        value = sub.value
        if isinstance(value, _StrValue):
            value = _coerce(str(value), hints[name], sub.key)
        elif isinstance(value, list):
            value = tuple(value)
        changes[name] = value
    try:
        return dataclasses.replace(cfg, **changes)
    except (TypeError, ValueError) as e:
        keys = ", ".join(sorted(changes))
        raise UserError(f"invalid value for {keys} of {type(cfg).__name__}: {e}") from None


def config_from_dict(cls, d: dict):
    """Rebuild a config dataclass from `to_dict`'s output (lists become tuples, dicts nested configs).

    A flat key that now lives in a nested config (an older, flat version of the class) is routed
    into it; keys the class no longer has are ignored, so a results folder written by an older
    version still renders; missing keys take their defaults."""
    kwargs = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.name not in d and dataclasses.is_dataclass(default):
            inner = {g.name for g in dataclasses.fields(default)}
            flat = {k: v for k, v in d.items() if k in inner and k not in names}
            if flat:
                kwargs[f.name] = config_from_dict(type(default), {**to_dict(default), **flat})
            continue
        if f.name not in d:
            continue
        v = d[f.name]
        if isinstance(v, dict) and dataclasses.is_dataclass(default):
            v = config_from_dict(type(default), {**to_dict(default), **v})
        elif isinstance(v, list):
            v = _tuples(v)
        kwargs[f.name] = v
    return cls(**kwargs)


def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def to_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def config_hash(cfg, exclude: tuple[str, ...] = ("seeds", "arms")) -> str:
    """Short stable hash of a config's values (run folders are keyed by it).

    Seeds and arms are left out: each (arm, seed) run is independent, so adding a seed or an arm to a
    finished experiment reuses the runs already done instead of starting over."""
    d = {k: v for k, v in to_dict(cfg).items() if k not in exclude}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]
