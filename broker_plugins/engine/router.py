"""Topic tries: who is subscribed to a topic, and which retained messages a filter matches.

``SubscriptionTrie.match`` walks one trie level per topic level (plus the ``+`` and
``#`` branches), so routing a message costs O(topic depth), not O(all filters).
``RetainedTrie.match`` walks the filter: literal levels are dictionary look-ups, so
``sites/plant-a/#`` never visits another site's retained messages. Filters whose first
level is a wildcard never match ``$`` topics (MQTT 3.1.1, 4.7.2). Pure, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

__all__ = ["RetainedTrie", "SubscriptionTrie"]

K = TypeVar("K")
V = TypeVar("V")


class _SubNode(Generic[K]):
    __slots__ = ("children", "hash_subs", "subs")

    def __init__(self) -> None:
        self.children: dict[str, _SubNode[K]] = {}
        self.subs: dict[K, int] = {}       # filters ending exactly here: subscriber -> QoS
        self.hash_subs: dict[K, int] = {}  # filters ending in '/#' below this node


class SubscriptionTrie(Generic[K]):
    """Subscribers (any hashable key) by topic filter, each with its granted QoS."""

    __slots__ = ("_count", "_root")

    def __init__(self) -> None:
        self._root: _SubNode[K] = _SubNode()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, topic_filter: str, key: K, qos: int) -> None:
        node = self._root
        levels = topic_filter.split("/")
        hashed = levels[-1] == "#"
        for level in levels[:-1] if hashed else levels:
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _SubNode()
            node = child
        target = node.hash_subs if hashed else node.subs
        if key not in target:
            self._count += 1
        target[key] = qos

    def remove(self, topic_filter: str, key: K) -> bool:
        levels = topic_filter.split("/")
        hashed = levels[-1] == "#"
        path: list[tuple[_SubNode[K], str]] = []
        node = self._root
        for level in levels[:-1] if hashed else levels:
            child = node.children.get(level)
            if child is None:
                return False
            path.append((node, level))
            node = child
        target = node.hash_subs if hashed else node.subs
        if target.pop(key, None) is None:
            return False
        self._count -= 1
        # prune empty branches so a churn of unique filters does not leak nodes
        while path and not (node.subs or node.hash_subs or node.children):
            parent, level = path.pop()
            del parent.children[level]
            node = parent
        return True

    def match(self, topic: str) -> dict[K, int]:
        """Every subscriber of ``topic`` with the highest QoS among its matching filters."""
        out: dict[K, int] = {}
        levels = topic.split("/")
        last = len(levels) - 1
        frontier = [self._root]
        dollar = topic.startswith("$")
        for index, level in enumerate(levels):
            following: list[_SubNode[K]] = []
            for node in frontier:
                if not (dollar and index == 0):
                    if node.hash_subs:
                        _merge(out, node.hash_subs)
                    plus = node.children.get("+")
                    if plus is not None:
                        following.append(plus)
                child = node.children.get(level)
                if child is not None:
                    following.append(child)
            if not following:
                return out
            frontier = following
            if index == last:
                for node in frontier:
                    if node.subs:
                        _merge(out, node.subs)
                    if node.hash_subs:  # 'a/#' also matches 'a'
                        _merge(out, node.hash_subs)
        return out


def _merge(out: dict[K, int], subs: dict[K, int]) -> None:
    if not out:
        out.update(subs)
        return
    for key, qos in subs.items():
        if out.get(key, -1) < qos:
            out[key] = qos


class _RetNode(Generic[V]):
    __slots__ = ("children", "value")

    def __init__(self) -> None:
        self.children: dict[str, _RetNode[V]] = {}
        self.value: V | None = None


class RetainedTrie(Generic[V]):
    """One value per topic name, found by topic filter."""

    __slots__ = ("_count", "_root")

    def __init__(self) -> None:
        self._root: _RetNode[V] = _RetNode()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def get(self, topic: str) -> V | None:
        node = self._root
        for level in topic.split("/"):
            child = node.children.get(level)
            if child is None:
                return None
            node = child
        return node.value

    def set(self, topic: str, value: V) -> V | None:
        """Store ``value`` at ``topic``; returns the value it replaced."""
        node = self._root
        for level in topic.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _RetNode()
            node = child
        previous = node.value
        node.value = value
        if previous is None:
            self._count += 1
        return previous

    def delete(self, topic: str) -> V | None:
        path: list[tuple[_RetNode[V], str]] = []
        node = self._root
        for level in topic.split("/"):
            child = node.children.get(level)
            if child is None:
                return None
            path.append((node, level))
            node = child
        previous = node.value
        if previous is None:
            return None
        node.value = None
        self._count -= 1
        while path and node.value is None and not node.children:
            parent, level = path.pop()
            del parent.children[level]
            node = parent
        return previous

    def match(self, topic_filter: str) -> Iterator[tuple[str, V]]:
        """(topic, value) for every stored topic the filter matches; lazily, so callers can batch.

        The trie may change between two steps (callers yield to the loop): each level is walked
        from a copy of its child names, and each child is looked up again when its turn comes. So
        every topic stored for the whole walk is yielded once, with its value at that moment; a
        topic deleted before its turn is not; one added meanwhile may or may not be. Memory is one
        list of names per level of the current path, not one entry per match.
        """
        levels = topic_filter.split("/")
        yield from self._walk(self._root, levels, 0, [])

    def _walk(self, node: _RetNode[V], levels: list[str], index: int, path: list[str]) -> Iterator[tuple[str, V]]:
        if index == len(levels):
            if node.value is not None:
                yield "/".join(path), node.value
            return
        level = levels[index]
        if level == "#":
            if node.value is not None and index > 0:  # 'a/#' matches 'a'
                yield "/".join(path), node.value
            yield from self._all(node, path, skip_dollar=index == 0)
            return
        if level == "+":
            for name in list(node.children):
                if index == 0 and name.startswith("$"):
                    continue
                child = node.children.get(name)
                if child is not None:
                    yield from self._walk(child, levels, index + 1, [*path, name])
            return
        literal = node.children.get(level)
        if literal is not None:
            yield from self._walk(literal, levels, index + 1, [*path, level])

    def _all(self, node: _RetNode[V], path: list[str], *, skip_dollar: bool) -> Iterator[tuple[str, V]]:
        """Every value strictly below ``node``, depth first."""
        stack: list[tuple[_RetNode[V], list[str], Iterator[str]]] = [(node, path, iter(list(node.children)))]
        while stack:
            parent, parent_path, names = stack[-1]
            name = next(names, None)
            if name is None:
                stack.pop()
                continue
            if skip_dollar and len(stack) == 1 and name.startswith("$"):
                continue
            child = parent.children.get(name)
            if child is None:  # deleted since the names were copied
                continue
            child_path = [*parent_path, name]
            if child.value is not None:
                yield "/".join(child_path), child.value
            if child.children:
                stack.append((child, child_path, iter(list(child.children))))
