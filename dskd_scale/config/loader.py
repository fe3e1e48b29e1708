"""Typed configs: frozen dataclass trees loaded from YAML plus dotted command-line overrides.

Every problem found while building a config (unknown key, wrong type, missing value, a failed ``validate()``
check) is collected, and one ``ConfigError`` lists them all, each with its dotted key path and, when the value
came from a YAML file, ``file:line``. Unknown keys get a "did you mean" suggestion.

A dataclass in the tree may define ``validate(self) -> list[str]``; its messages start with the field name
relative to that dataclass (``"temperature must be > 0, got 0.0"``) and are reported under the full key path.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")

__all__ = ["ConfigError", "load_config", "build_config", "parse_overrides", "config_to_dict", "save_config"]


class ConfigError(ValueError):
    """All problems found in one config, one per line."""

    def __init__(self, problems: Sequence[str], *, source: str | None = None):
        self.problems = list(problems)
        header = f"invalid config{f' {source}' if source else ''} ({len(self.problems)} problem(s)):"
        super().__init__("\n".join([header, *(f"  - {p}" for p in self.problems)]))


_MISSING = object()


def _yaml_with_lines(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """Parse YAML and remember the 1-based line of every mapping key, by dotted path."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        raise ConfigError([f"{source}: not valid YAML: {err}"]) from err
    lines: dict[str, int] = {}

    def walk(n: yaml.Node, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for key_node, value_node in n.value:
                path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
                lines[path] = key_node.start_mark.line + 1
                walk(value_node, path)

    if node is not None:
        walk(node, "")
    data = yaml.safe_load(text)
    return ({} if data is None else data), lines


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["kd.temperature=2.0", "train.lr=1e-4"]`` -> nested dict; values parsed as YAML scalars/lists."""
    nested: dict[str, Any] = {}
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override '{item}': expected KEY=VALUE with a dotted key, e.g. kd.temperature=2.0")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            existing = node.setdefault(part, {})
            if not isinstance(existing, dict):
                problems.append(f"override '{item}': '{part}' was already set to a value")
                break
            node = existing
        else:
            node[parts[-1]] = value
    if problems:
        raise ConfigError(problems, source="(command line)")
    return nested


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


class _Builder:
    def __init__(self, lines: dict[str, int], source: str | None, override_keys: set[str]):
        self.lines = lines
        self.source = source
        self.override_keys = override_keys
        self.problems: list[str] = []
        self.failed: set[str] = set()  # dotted paths of fields whose value could not be converted

    def where(self, path: str) -> str:
        if path in self.override_keys:
            return f"{path} (command line)"
        if self.source and path in self.lines:
            return f"{path} ({self.source}:{self.lines[path]})"
        return path

    def error(self, path: str, message: str) -> object:
        self.problems.append(f"{self.where(path)}: {message}")
        return _MISSING

    def build(self, cls: type, data: Any, path: str) -> Any:
        if not isinstance(data, Mapping):
            return self.error(path or "<root>", f"expected a mapping of {cls.__name__} fields, got {data!r}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        for key in data:
            if key not in fields:
                suggestion = difflib.get_close_matches(str(key), list(fields), n=1)
                hint = f"; did you mean '{suggestion[0]}'?" if suggestion else f"; known keys: {', '.join(fields)}"
                self.error(_join(path, key), f"unknown key{hint}")
        kwargs = {}
        for name, field in fields.items():
            field_path = _join(path, name)
            if name in data:
                value = self.convert(hints[name], data[name], field_path)
            elif field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING:
                continue
            elif dataclasses.is_dataclass(hints[name]):
                value = self.build(hints[name], {}, field_path)
            else:
                value = self.error(field_path, "required, but not set")
            if value is _MISSING:
                # Already reported. Build the rest with this field's default so that validate() still reports
                # the range checks of every other field in the same error list (not in a second run).
                self.failed.add(field_path)
            else:
                kwargs[name] = value
        try:
            instance = cls(**kwargs)
        except TypeError as err:  # a required field already reported above
            if not self.problems:
                self.error(path or "<root>", str(err))
            return _MISSING
        validate = getattr(instance, "validate", None)
        if callable(validate):
            for message in validate():
                field, sep, rest = message.partition(" ")
                key = _join(path, field.split("=", 1)[0])
                if self._under_failed(key):  # a check of the stand-in default, not of what the user wrote
                    continue
                self.problems.append(f"{self.where(_join(path, field))} {rest}" if sep else message)
        return instance

    def _under_failed(self, key: str) -> bool:
        """Whether ``key`` is, contains or lies inside a field that failed to convert."""
        return any(key == bad or key.startswith(f"{bad}.") or bad.startswith(f"{key}.") for bad in self.failed)

    def convert(self, annotation: Any, value: Any, path: str) -> Any:
        origin = typing.get_origin(annotation)
        args = typing.get_args(annotation)
        if annotation is Any:
            return value
        if origin in (typing.Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            candidates = [a for a in args if a is not type(None)]
            saved, saved_failed = list(self.problems), set(self.failed)
            for candidate in candidates:
                self.problems = []
                converted = self.convert(candidate, value, path)
                if not self.problems:
                    self.problems, self.failed = saved, saved_failed
                    return converted
            self.problems, self.failed = saved, saved_failed
            names = " or ".join(_type_name(a) for a in args)
            return self.error(path, f"expected {names}, got {value!r}")
        if origin is typing.Literal:
            if value in args:
                return value
            return self.error(path, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
        if dataclasses.is_dataclass(annotation):
            return self.build(annotation, value, path)
        if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
            try:
                return annotation(value)
            except ValueError:
                allowed = ", ".join(repr(m.value) for m in annotation)
                return self.error(path, f"must be one of {allowed}, got {value!r}")
        if origin in (list, tuple, Sequence) or annotation in (list, tuple):
            if not isinstance(value, list | tuple):
                return self.error(path, f"expected a list, got {value!r}")
            item_type = args[0] if args else Any
            items = [self.convert(item_type, v, f"{path}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if origin is tuple or annotation is tuple else items
        if origin in (dict, Mapping) or annotation is dict:
            if not isinstance(value, Mapping):
                return self.error(path, f"expected a mapping, got {value!r}")
            value_type = args[1] if len(args) == 2 else Any
            return {str(k): self.convert(value_type, v, f"{path}.{k}") for k, v in value.items()}
        if annotation is bool:
            if isinstance(value, bool):
                return value
            return self.error(path, f"expected true/false, got {value!r}")
        if annotation is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            return self.error(path, f"expected an integer, got {value!r}")
        if annotation is float:
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
                try:
                    return float(value)
                except ValueError:
                    pass
            return self.error(path, f"expected a number, got {value!r}")
        if annotation is str:
            if isinstance(value, str):
                return value
            return self.error(path, f"expected a string, got {value!r}")
        if annotation is Path:
            if isinstance(value, str | Path):
                return Path(value)
            return self.error(path, f"expected a path, got {value!r}")
        return value


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _type_name(annotation: Any) -> str:
    return "null" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def _override_paths(nested: Mapping[str, Any], prefix: str = "") -> set[str]:
    paths = set()
    for key, value in nested.items():
        path = _join(prefix, key)
        paths.add(path)
        if isinstance(value, Mapping):
            paths |= _override_paths(value, path)
    return paths


def build_config(cls: type[C], data: Mapping[str, Any], overrides: Sequence[str] = (), *,
                 source: str | None = None, lines: dict[str, int] | None = None) -> C:
    """Build ``cls`` from a plain mapping plus dotted overrides; raise one ConfigError listing every problem."""
    override_tree = parse_overrides(overrides)
    merged = _deep_merge(dict(data), override_tree)
    builder = _Builder(lines or {}, source, _override_paths(override_tree))
    config = builder.build(cls, merged, "")
    if builder.problems or config is _MISSING:
        raise ConfigError(builder.problems or ["could not build the config"], source=source)
    return config


def load_config(cls: type[C], path: str | Path | None, overrides: Sequence[str] = ()) -> C:
    """Load ``cls`` from a YAML file (or only defaults when ``path`` is None) plus dotted overrides."""
    if path is None:
        return build_config(cls, {}, overrides)
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError([f"cannot read config file {path}: {err.strerror}"]) from err
    data, lines = _yaml_with_lines(text, str(path))
    if not isinstance(data, Mapping):
        raise ConfigError([f"{path}: the top level must be a mapping of sections, got {type(data).__name__}"])
    return build_config(cls, data, overrides, source=str(path), lines=lines)


def config_to_dict(config: Any) -> Any:
    """Plain YAML-safe data (enums as values, paths and tuples as str/list)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: config_to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, enum.Enum):
        return config.value
    if isinstance(config, Path):
        return str(config)
    if isinstance(config, list | tuple):
        return [config_to_dict(v) for v in config]
    if isinstance(config, Mapping):
        return {str(k): config_to_dict(v) for k, v in config.items()}
    return config


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically, so a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    tmp.replace(path)
