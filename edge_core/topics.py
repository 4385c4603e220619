"""MQTT 3.1.1 topic names, topic filters and the reference matcher.

Plain values and plain functions, no I/O. ``TopicName`` and ``TopicFilter`` check
themselves when constructed and raise ``InvalidTopic`` (a ``ValueError``). The rules
are those of MQTT 3.1.1 section 4.7:

- both are at least one character and at most 65535 UTF-8 bytes, and contain no NUL;
- levels are separated by ``/`` and may be empty (``a//b``, ``/a`` and ``a/`` are valid);
- a topic name contains no ``+`` or ``#``;
- in a filter ``+`` is a whole level, and ``#`` is a whole level and the last one;
- ``a/#`` also matches its parent ``a``;
- a filter whose first level is ``+`` or ``#`` never matches a topic whose first level
  starts with ``$`` (``$SYS/...``); only a filter that starts with that ``$`` level does.

``filter_matches``, ``filter_covers`` and ``filters_overlap`` work on level sequences
that are already valid. They are the slow, obviously correct reference that the ACL's
compiled matcher is tested against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "MAX_TOPIC_BYTES",
    "MULTI_LEVEL",
    "SEPARATOR",
    "SINGLE_LEVEL",
    "InvalidTopic",
    "TopicFilter",
    "TopicName",
    "filter_covers",
    "filter_matches",
    "filters_overlap",
    "topic_filter_problem",
    "topic_name_problem",
]

MAX_TOPIC_BYTES = 65535
SEPARATOR = "/"
SINGLE_LEVEL = "+"
MULTI_LEVEL = "#"
_WILDCARDS = frozenset({SINGLE_LEVEL, MULTI_LEVEL})
# Below this many characters even 4-byte UTF-8 cannot exceed the limit, so no encoding is needed.
_SAFE_CHARS = MAX_TOPIC_BYTES // 4


class InvalidTopic(ValueError):
    """A topic name or filter breaks the MQTT 3.1.1 rules."""


def _string_problem(value: str) -> str | None:
    if not value:
        return "must not be empty"
    if "\x00" in value:
        return "contains NUL"
    if len(value) > _SAFE_CHARS or not value.isascii():
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            return "is not valid UTF-8 (it contains a lone surrogate)"
        if size > MAX_TOPIC_BYTES:
            return f"is {size} UTF-8 bytes; MQTT allows at most {MAX_TOPIC_BYTES}"
    return None


def topic_name_problem(value: str) -> str | None:
    """Why ``value`` is not a valid topic name, or None if it is one."""
    if "+" in value or "#" in value:
        return "a topic name must not contain the wildcards '+' or '#'"
    return _string_problem(value)


def topic_filter_problem(value: str) -> str | None:
    """Why ``value`` is not a valid topic filter, or None if it is one."""
    problem = _string_problem(value)
    if problem is not None:
        return problem
    if "+" not in value and "#" not in value:
        return None
    levels = value.split(SEPARATOR)
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if level == MULTI_LEVEL:
            if index != last:
                return "'#' must be the last level"
        elif MULTI_LEVEL in level:
            return f"'#' must occupy a whole level, not appear inside {level!r}"
        elif level != SINGLE_LEVEL and SINGLE_LEVEL in level:
            return f"'+' must occupy a whole level, not appear inside {level!r}"
    return None


@dataclass(frozen=True)
class TopicName:
    """A topic a message is published to: no wildcards."""

    value: str

    def __post_init__(self) -> None:
        if not isinstance(self.value, str):
            raise InvalidTopic(f"topic name must be a str, not {type(self.value).__name__}")
        problem = topic_name_problem(self.value)
        if problem is not None:
            raise InvalidTopic(f"topic name {_short(self.value)}: {problem}")

    @property
    def levels(self) -> tuple[str, ...]:
        return tuple(self.value.split(SEPARATOR))

    @property
    def is_dollar(self) -> bool:
        """True for ``$SYS/...`` and other topics that leading wildcards never match."""
        return self.value.startswith("$")

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class TopicFilter:
    """A subscription or ACL filter: ``+`` and ``#`` allowed as whole levels."""

    value: str

    def __post_init__(self) -> None:
        if not isinstance(self.value, str):
            raise InvalidTopic(f"topic filter must be a str, not {type(self.value).__name__}")
        problem = topic_filter_problem(self.value)
        if problem is not None:
            raise InvalidTopic(f"topic filter {_short(self.value)}: {problem}")

    @property
    def levels(self) -> tuple[str, ...]:
        return tuple(self.value.split(SEPARATOR))

    @property
    def has_wildcards(self) -> bool:
        return any(level in _WILDCARDS for level in self.levels)

    def matches(self, topic: TopicName | str) -> bool:
        name = topic if isinstance(topic, TopicName) else TopicName(topic)
        return filter_matches(self.levels, name.levels)

    def covers(self, other: TopicFilter | str) -> bool:
        """True if every topic ``other`` matches is matched by this filter."""
        narrower = other if isinstance(other, TopicFilter) else TopicFilter(other)
        return filter_covers(self.levels, narrower.levels)

    def overlaps(self, other: TopicFilter | str) -> bool:
        """True if at least one topic is matched by both filters."""
        peer = other if isinstance(other, TopicFilter) else TopicFilter(other)
        return filters_overlap(self.levels, peer.levels)

    def __str__(self) -> str:
        return self.value


def _is_dollar_level(level: str) -> bool:
    return level.startswith("$")


def filter_matches(filter_levels: Sequence[str], topic_levels: Sequence[str]) -> bool:
    """Reference matcher: does the filter match the topic (both already valid)?"""
    if filter_levels[0] in _WILDCARDS and _is_dollar_level(topic_levels[0]):
        return False
    for index, level in enumerate(filter_levels):
        if level == MULTI_LEVEL:
            return True  # also the parent: 'a/#' matches 'a'
        if index >= len(topic_levels):
            return False
        if level != SINGLE_LEVEL and level != topic_levels[index]:
            return False
    return len(filter_levels) == len(topic_levels)


def filter_covers(general: Sequence[str], specific: Sequence[str]) -> bool:
    """True if every topic matched by ``specific`` is matched by ``general``."""
    if general[0] in _WILDCARDS and _is_dollar_level(specific[0]):
        return False
    for index, level in enumerate(general):
        if level == MULTI_LEVEL:
            return True
        if index >= len(specific):
            return False  # 'specific' ends here, 'general' needs more levels
        narrow = specific[index]
        if narrow == MULTI_LEVEL:
            return False  # only '#' covers '#'
        if level not in (SINGLE_LEVEL, narrow):
            return False  # a literal covers only itself, never '+'
    return len(general) == len(specific)


def filters_overlap(first: Sequence[str], second: Sequence[str]) -> bool:
    """True if some topic is matched by both filters."""
    if (first[0] in _WILDCARDS and _is_dollar_level(second[0])) or (
        second[0] in _WILDCARDS and _is_dollar_level(first[0])
    ):
        return False
    for index in range(max(len(first), len(second))):
        left = first[index] if index < len(first) else None
        right = second[index] if index < len(second) else None
        if MULTI_LEVEL in (left, right):
            return True
        if left is None or right is None:
            return False
        if SINGLE_LEVEL not in (left, right) and left != right:
            return False
    return True


def _short(value: str) -> str:
    return repr(value) if len(value) <= 80 else repr(value[:77] + "...")
