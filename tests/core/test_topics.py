"""MQTT 3.1.1 topic names, filters and the reference matcher (spec section 4.7)."""

from __future__ import annotations

import dataclasses

import pytest

from edge_core.topics import (
    MAX_TOPIC_BYTES,
    InvalidTopic,
    TopicFilter,
    TopicName,
    topic_filter_problem,
    topic_name_problem,
)


@pytest.mark.parametrize(
    "value",
    ["a", "/", "//", "a//b", "/finance", "a/", "$SYS/broker/load", "a/$b", "température/🌡/温度", "a b/c d"],
)
def test_valid_topic_names(value: str) -> None:
    assert TopicName(value).value == value
    assert topic_name_problem(value) is None


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "must not be empty"),
        ("a/+", "wildcards"),
        ("a/#", "wildcards"),
        ("+", "wildcards"),
        ("a\x00b", "NUL"),
        ("a/\ud800", "lone surrogate"),
    ],
)
def test_invalid_topic_names(value: str, reason: str) -> None:
    with pytest.raises(InvalidTopic, match=reason):
        TopicName(value)


def test_topic_size_limit_counts_utf8_bytes_not_characters() -> None:
    assert TopicName("a" * MAX_TOPIC_BYTES)
    with pytest.raises(InvalidTopic, match="65536 UTF-8 bytes"):
        TopicName("a" * (MAX_TOPIC_BYTES + 1))
    two_byte = "é" * (MAX_TOPIC_BYTES // 2)  # 65534 bytes in 32767 characters
    assert TopicName(two_byte + "a")
    with pytest.raises(InvalidTopic, match="65536 UTF-8 bytes"):
        TopicName(two_byte + "é")
    four_byte = "🌡" * (MAX_TOPIC_BYTES // 4 + 1)  # few characters, too many bytes
    assert topic_name_problem(four_byte) is not None


@pytest.mark.parametrize(
    "value", ["#", "+", "+/+", "a/#", "/#", "a//+", "+/b/#", "$SYS/#", "$SYS/+/x", "a/+/#", "ü/+/温度"]
)
def test_valid_filters(value: str) -> None:
    assert TopicFilter(value).value == value


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "must not be empty"),
        ("a#", "'#' must occupy a whole level"),
        ("a/#/b", "'#' must be the last level"),
        ("#/a", "'#' must be the last level"),
        ("a+", "'+' must occupy a whole level"),
        ("+a/b", "'+' must occupy a whole level"),
        ("a/b\x00", "NUL"),
        ("a/" * 40000, "UTF-8 bytes"),
    ],
)
def test_invalid_filters(value: str, reason: str) -> None:
    assert topic_filter_problem(value) is not None
    with pytest.raises(InvalidTopic) as raised:
        TopicFilter(value)
    assert reason in str(raised.value)


def test_values_are_frozen_and_typed() -> None:
    topic = TopicName("a/b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        topic.value = "c"  # type: ignore[misc]
    with pytest.raises(InvalidTopic, match="must be a str"):
        TopicFilter(b"a/b")  # type: ignore[arg-type]


# The examples of MQTT 3.1.1 section 4.7, plus empty levels and $ topics.
MATCHES = [
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/#", "sport", True),
    ("sport/tennis/#", "sport/tennisplayer1", False),
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("+", "a", True),
    ("#", "a/b/c", True),
    ("#", "/", True),
    ("a//b", "a//b", True),
    ("a/+/b", "a//b", True),
    ("a/b", "a/b/", False),
    ("#", "$SYS/broker", False),
    ("+/broker", "$SYS/broker", False),
    ("$SYS/#", "$SYS/broker/clients", True),
    ("$SYS/+/clients", "$SYS/broker/clients", True),
    ("$SYS/#", "$SYS", True),
    ("#", "a/$SYS", True),
    ("+/$SYS", "a/$SYS", True),
    ("températures/+", "températures/温度", True),
]


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), MATCHES)
def test_spec_matching_examples(topic_filter: str, topic: str, expected: bool) -> None:
    assert TopicFilter(topic_filter).matches(topic) is expected


COVERS = [
    ("#", "a/b", True),
    ("#", "#", True),
    ("#", "+/#", True),
    ("#", "$SYS/#", False),
    ("+/#", "$SYS/x", False),
    ("$SYS/#", "$SYS/x/+", True),
    ("a/#", "a", True),
    ("a/#", "a/#", True),
    ("a/+", "a/#", False),
    ("a/+", "a/b", True),
    ("a/+", "a/+", True),
    ("a/b", "a/+", False),
    ("a/+/c", "a/+/c", True),
    ("a/+/c", "a/b/+", False),
    ("a/b/#", "a/#", False),
    ("a/#", "a/b/#", True),
    ("a", "a/#", False),
    ("+/+", "/+", True),
    ("a/+", "a", False),
]


@pytest.mark.parametrize(("general", "specific", "expected"), COVERS)
def test_filter_containment(general: str, specific: str, expected: bool) -> None:
    assert TopicFilter(general).covers(specific) is expected


OVERLAPS = [
    ("#", "$SYS/x", False),
    ("+/x", "$SYS/x", False),
    ("$SYS/#", "$SYS/+", True),
    ("a/#", "a", True),
    ("a", "a/+", False),
    ("a/+", "+/b", True),
    ("a/b", "a/c", False),
    ("a/+/c", "a/b/#", True),
    ("a/+", "a/b/c", False),
    ("#", "+", True),
]


@pytest.mark.parametrize(("first", "second", "expected"), OVERLAPS)
def test_filter_overlap_is_symmetric(first: str, second: str, expected: bool) -> None:
    assert TopicFilter(first).overlaps(second) is expected
    assert TopicFilter(second).overlaps(first) is expected
