"""YAML that remembers where things came from.

Admins edit registry and ACL files by hand, so every error must name the file and
the line. ``load`` parses with ``yaml.SafeLoader`` into ``Mapping``/``Sequence``
objects that carry line numbers (1-based) for themselves and their entries, and
refuses duplicate keys, which plain PyYAML silently lets the last one win.
``Section`` is a small reader that turns unknown keys and wrong types into
``ConfigError`` with file and line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import yaml

from edge_core.errors import ConfigError

__all__ = ["LineDict", "LineList", "Section", "load", "load_settings_file"]

T = TypeVar("T")


class LineDict(dict[str, Any]):
    line: int = 0
    key_lines: dict[str, int]


class LineList(list[Any]):
    line: int = 0
    item_lines: list[int]


# libyaml's C parser when PyYAML was built with it (about 5x faster on large ACL files);
# the constructors below, and so the line numbers, are the same either way.
_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_BaseLoader):  # type: ignore[valid-type,misc]
    source_name: str = "<yaml>"


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> LineDict:
    loader.flatten_mapping(node)
    result = LineDict()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, str):
            raise ConfigError(f"key {key!r} must be a string", source=loader.source_name, line=line)
        if key in result:
            raise ConfigError(
                f"duplicate key '{key}' (first at line {result.key_lines[key]})",
                source=loader.source_name,
                line=line,
            )
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = line
    return result


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> LineList:
    result = LineList(loader.construct_object(child, deep=True) for child in node.value)
    result.line = node.start_mark.line + 1
    result.item_lines = [child.start_mark.line + 1 for child in node.value]
    return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def load(text: str | bytes, *, source: str) -> Any:
    """Parse YAML text; errors become ``ConfigError`` naming ``source`` and the line."""
    loader = _Loader(text)
    loader.source_name = source
    try:
        return loader.get_single_data()
    except ConfigError:
        raise
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(f"YAML syntax error: {exc.problem or exc}", source=source, line=line) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"YAML error: {exc}", source=source) from exc
    finally:
        loader.dispose()


class Section:
    """A mapping read with known keys only. Use ``take`` for each key, then ``done``."""

    def __init__(self, data: Any, *, source: str, line: int | None = None, what: str = "section") -> None:
        if not isinstance(data, dict):
            raise ConfigError(
                f"{what} must be a mapping, not {_kind(data)}",
                source=source,
                line=getattr(data, "line", line),
            )
        self.data = data
        self.source = source
        self.what = what
        self.line = getattr(data, "line", line)
        self._seen: set[str] = set()

    def line_of(self, key: str) -> int | None:
        lines: dict[str, int] = getattr(self.data, "key_lines", {})
        return lines.get(key, self.line)

    def error(self, key: str | None, reason: str) -> ConfigError:
        line = self.line_of(key) if key is not None else self.line
        return ConfigError(reason, source=self.source, line=line)

    def take(self, key: str, kind: type[T], default: T | None = None, *, required: bool = False) -> T:
        self._seen.add(key)
        if key not in self.data:
            if required:
                raise self.error(None, f"{self.what}: missing required key '{key}'")
            return cast("T", default)
        value = self.data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.error(key, f"{self.what}: '{key}' must be {kind.__name__}, not {_kind(value)}")
        return value

    def sub(self, key: str, *, required: bool = False) -> Section | None:
        self._seen.add(key)
        if key not in self.data or self.data[key] is None:
            if required:
                raise self.error(None, f"{self.what}: missing required section '{key}'")
            return None
        return Section(self.data[key], source=self.source, line=self.line_of(key), what=f"{self.what}.{key}")

    def items(self) -> Iterator[tuple[str, Any, int | None]]:
        for key, value in self.data.items():
            self._seen.add(key)
            yield key, value, self.line_of(key)

    def done(self) -> None:
        unknown = [k for k in self.data if k not in self._seen]
        if unknown:
            key = unknown[0]
            raise self.error(key, f"{self.what}: unknown key '{key}'")


def _kind(value: Any) -> str:
    if value is None:
        return "empty"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def load_settings_file(path: Path | str, what: str, parse: Callable[..., T]) -> T:
    """Read a settings file and ``parse(text, source=, base_dir=)`` it, paths relative to its folder.

    An unreadable file is a ``ConfigError`` naming it; the parser reports file and line itself.
    """
    p = Path(path)
    try:
        text = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what}: {exc.strerror}", source=str(p)) from exc
    return parse(text, source=str(p), base_dir=p.resolve().parent)
