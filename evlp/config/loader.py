"""Loading typed configs: dataclass defaults <- model preset <- YAML recipe <- ``key.sub=value`` overrides.

Every unknown key and every bad value is collected, and one :class:`~evlp.errors.ConfigError`
lists them all with "did you mean" hints. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from evlp.errors import ConfigError
from evlp.io import write_atomic
from evlp.registry import did_you_mean

T = TypeVar("T")

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


# --------------------------------------------------------------------------- overrides and merging
def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Turn ``["train.batch_size=32", "data.train=[a,b]"]`` into a nested dict.

    Values are parsed as YAML scalars/lists (``null`` -> None, ``[a,b]`` -> list), falling back to the
    raw string.

    Raises:
        ConfigError: an item has no ``=`` or an empty key.
    """
    out: dict[str, Any] = {}
    problems: list[str] = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"override '{item}' is not of the form key.sub=value")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(f"override '{item}' conflicts with an earlier override of '{part}'")
                break
            node = child
        else:
            node[parts[-1]] = value
    if problems:
        raise ConfigError(_summary(problems), problems)
    return out


def merge(base: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``delta`` into a copy of ``base`` (dicts merge, everything else replaces)."""
    out = dict(base)
    for key, value in delta.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------- dict <-> dataclass
def lookup(tree: Any, dotted: str) -> Any:
    """The value at ``a.b.c`` in a nested dict, or None where the path does not exist."""
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def differences(saved: Any, now: Any, key: str = "", *, common_only: bool = False) -> list[str]:
    """The dotted keys whose values differ between two config trees, sections compared key by key.

    A key absent on one side counts as None, or is passed over with ``common_only`` (e.g. settings a newer
    release added that an older record lacks).
    """
    if isinstance(saved, dict) and isinstance(now, dict):
        keys = [k for k in now if k in saved] if common_only else list({**saved, **now})
        return [d for k in keys
                for d in differences(saved.get(k), now.get(k), f"{key}.{k}" if key else k, common_only=common_only)]
    return [] if saved == now else [key]


def to_dict(obj: Any) -> Any:
    """A dataclass (tree) as plain YAML-safe Python: dicts, lists, scalars."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def from_dict(cls: type[T], data: dict[str, Any], *, where: str = "") -> T:
    """Build ``cls`` from a (partial) nested dict, coercing and checking every value.

    Raises:
        ConfigError: listing every unknown key, bad value and failed validation at once.
    """
    problems: list[str] = []
    obj = _build(cls, data, "", problems)
    if not problems and hasattr(obj, "validate"):
        problems.extend(obj.validate())
    if problems:
        raise ConfigError(_summary(problems, where), problems)
    return obj


def _summary(problems: list[str], where: str = "") -> str:
    head = f"{len(problems)} problem{'s' if len(problems) != 1 else ''} in {where or 'the configuration'}"
    return head + ":\n" + "\n".join(f"  - {p}" for p in problems)


def _build(cls: type, data: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(data, dict):
        problems.append(f"{path.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
        return cls()
    presets = getattr(cls, "__presets__", None)
    if presets is not None and "name" in {f.name for f in dataclasses.fields(cls)}:
        name = data.get("name", cls().name)
        delta = presets(name)
        if delta is None:
            known = presets(None)
            problems.append(f"{path}name: unknown preset '{name}'{did_you_mean(str(name), known)}; "
                            f"choose one of: {', '.join(known)}")
        else:
            data = merge(delta, data)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    defaults = None
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f" (did you mean '{path}{close[0]}'?)" if close else f" (valid: {', '.join(fields)})"
            problems.append(f"unknown key '{path}{key}'{hint}")
            continue
        tp = hints[key]
        item = _section_item(tp)
        if item is not None and isinstance(value, (list, tuple)):  # a list of sections (data.sources)
            kwargs[key] = [_build(item, v, f"{path}{key}[{i}].", problems) for i, v in enumerate(value)]
        elif dataclasses.is_dataclass(tp):
            if isinstance(value, dict):  # keep what this class's own default changes in the section
                defaults = defaults if defaults is not None else cls()
                own, plain = to_dict(getattr(defaults, key)), to_dict(tp())
                value = merge({k: v for k, v in own.items() if plain.get(k) != v}, value)
            kwargs[key] = _build(tp, value, f"{path}{key}.", problems)
        else:
            kwargs[key] = _coerce(value, tp, f"{path}{key}", problems)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - every field has a default
        problems.append(f"{path or 'config'}: {exc}")
        return cls()


def _section_item(tp: Any) -> type | None:
    """The item class of a ``list[SomeSection]`` field (a list of dataclasses), else None."""
    args = get_args(tp)
    return args[0] if get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]) else None


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (list, tuple):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in get_args(tp) if a is not Ellipsis)}]"
    return getattr(tp, "__name__", str(tp))


class _Bad(Exception):
    pass


class _NotFinite(Exception):
    """A float setting (or a float inside a list/tuple setting) is NaN or infinite."""

    def __init__(self, value: float) -> None:
        super().__init__(value)
        self.value = value
        self.index: list[int] = []  # positions inside nested lists/tuples, outermost first


def _coerce(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    try:
        return _convert(value, tp)
    except _NotFinite as exc:  # never silently accepted as another type of a union (e.g. a string)
        where = path + "".join(f"[{i}]" for i in exc.index)
        inside = f" (in {_shown(value)})" if exc.index else ""
        problems.append(f"{where}: must be a finite number, got {exc.value}{inside}; "
                        "NaN and infinity are not valid settings, give a real value")
        return None
    except _Bad:
        hint = ""
        if get_origin(tp) is Literal and isinstance(value, str):
            hint = did_you_mean(value, tuple(str(a) for a in get_args(tp)))
        problems.append(f"{path}: expected {_type_name(tp)}, got {_shown(value)}{hint}")
        return None


def _shown(value: Any) -> str:
    return repr(value) if not isinstance(value, str) else f"'{value}'"


def _items(values: Any, types_: Any) -> list[Any]:
    """Convert list/tuple items, recording the position of a non-finite float."""
    out = []
    for i, (v, t) in enumerate(zip(values, types_)):
        try:
            out.append(_convert(v, t))
        except _NotFinite as exc:
            exc.index.insert(0, i)
            raise
    return out


def _convert(value: Any, tp: Any) -> Any:  # noqa: C901 - one branch per supported type
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None or (isinstance(value, str) and value.strip().lower() in {"null", "none", "~"}):
            if type(None) in args:
                return None
            raise _Bad
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg)
            except _Bad:
                continue
        raise _Bad
    if origin is Literal:
        for arg in get_args(tp):
            if value == arg or (isinstance(value, str) and str(arg) == value):
                return arg
        raise _Bad
    if origin in (list, tuple):
        args = get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",")] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise _Bad
        if origin is list:
            return _items(value, [args[0] if args else Any] * len(value))
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_items(value, [args[0]] * len(value)))
        if args and len(value) != len(args):
            raise _Bad
        return tuple(_items(value, args or [Any] * len(value)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise _Bad
    if tp is int:
        if isinstance(value, bool):
            raise _Bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                raise _Bad from None
            if f.is_integer():
                return int(f)
        raise _Bad
    if tp is float:
        if isinstance(value, bool):
            raise _Bad
        if isinstance(value, (int, float)):
            try:
                number = float(value)
            except OverflowError:  # an int beyond float's range
                number = math.inf if value > 0 else -math.inf
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise _Bad from None
        else:
            raise _Bad
        if not math.isfinite(number):  # nan, inf, .inf, 1e999 ...: every float setting must be a real number
            raise _NotFinite(number)
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Bad
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _Bad


# --------------------------------------------------------------------------- YAML files
def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping (an empty file is ``{}``).

    Raises:
        ConfigError: the file is missing, not UTF-8, unparsable, or not a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        bad = exc.object[exc.start:exc.start + 4]
        raise ConfigError(f"config file {p} is not UTF-8 text (byte offset {exc.start}: {bad!r}); "
                          "save it as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"config file {p} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of keys, got {type(data).__name__}")
    return data


def dump_yaml(obj: Any) -> str:
    """A dataclass or dict as YAML text, keys in declaration order."""
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=None, width=100)


def save_config(obj: Any, path: str | os.PathLike[str]) -> None:
    """Save a resolved config as YAML, atomically."""
    write_atomic(path, dump_yaml(obj))


def load_config(
    cls: type[T],
    config: str | os.PathLike[str] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    command: str | None = None,
    extra: dict[str, Any] | None = None,
) -> T:
    """Resolve a config: defaults <- preset <- recipe YAML <- ``extra`` <- ``overrides``.

    Args:
        cls: the schema dataclass.
        config: a shipped recipe name (``tiny``, ``s_smke.yaml``) or a YAML path; ``None`` = defaults.
        overrides: ``key.sub=value`` strings.
        command: which recipe folder to look in first (``pretrain``).
        extra: values set by dedicated CLI options (``--data``, ``--out``), below ``overrides``.

    Raises:
        ConfigError: with every problem found.
    """
    from evlp.config import CONFIG_SCHEMAS  # local: the package imports this module
    from evlp.config.recipes import find_recipe

    if command is None:  # recipes of several commands share names (tiny): pick the schema's own folder
        command = next((name for name, schema in CONFIG_SCHEMAS.items() if schema is cls), None)
    data: dict[str, Any] = {}
    where = "the configuration"
    if config is not None:
        path = find_recipe(str(config), command=command)
        data = read_yaml(path)
        where = f"config '{config}'"
    if extra:
        data = merge(data, extra)
    data = merge(data, parse_overrides(list(overrides)))
    return from_dict(cls, data, where=where)

