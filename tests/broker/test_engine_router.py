"""The engine's tries, checked against the reference matcher of ``edge_core.topics``."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from broker_plugins.engine.router import RetainedTrie, SubscriptionTrie
from edge_core.topics import filter_matches

LEVELS = st.sampled_from(["a", "b", "$SYS", "", "c"])
TOPICS = st.lists(LEVELS, min_size=1, max_size=4).map("/".join)
FILTER_LEVELS = st.sampled_from(["a", "b", "$SYS", "", "+"])


@st.composite
def filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(FILTER_LEVELS, min_size=1, max_size=4))
    if draw(st.booleans()):
        levels.append("#")
    return "/".join(levels)


@settings(max_examples=300, deadline=None)
@given(st.lists(filters(), min_size=1, max_size=12), TOPICS)
def test_subscription_trie_matches_the_reference(subscribed: list[str], topic: str) -> None:
    trie: SubscriptionTrie[int] = SubscriptionTrie()
    for key, topic_filter in enumerate(subscribed):
        trie.add(topic_filter, key, key % 3)
    expected = {key for key, f in enumerate(subscribed) if filter_matches(f.split("/"), topic.split("/"))}
    assert set(trie.match(topic)) == expected


@settings(max_examples=300, deadline=None)
@given(st.lists(TOPICS, min_size=1, max_size=12, unique=True), filters())
def test_retained_trie_matches_the_reference(stored: list[str], topic_filter: str) -> None:
    trie: RetainedTrie[str] = RetainedTrie()
    for topic in stored:
        trie.set(topic, topic)
    expected = {t for t in stored if filter_matches(topic_filter.split("/"), t.split("/"))}
    assert {topic for topic, _ in trie.match(topic_filter)} == expected


def test_highest_qos_of_overlapping_filters_wins() -> None:
    trie: SubscriptionTrie[str] = SubscriptionTrie()
    trie.add("a/#", "s", 2)
    trie.add("a/+", "s", 1)
    trie.add("a/b", "t", 0)
    assert trie.match("a/b") == {"s": 2, "t": 0}


def test_remove_prunes_and_counts() -> None:
    trie: SubscriptionTrie[str] = SubscriptionTrie()
    for i in range(100):
        trie.add(f"x/{i}/y", "s", 0)
    assert len(trie) == 100
    for i in range(100):
        assert trie.remove(f"x/{i}/y", "s")
    assert len(trie) == 0 and not trie._root.children
    assert not trie.remove("x/1/y", "s")


def test_match_cost_does_not_grow_with_unrelated_filters() -> None:
    """100,000 filters of other devices: matching visits only the topic's own path."""
    trie: SubscriptionTrie[int] = SubscriptionTrie()
    for i in range(100_000):
        trie.add(f"devices/d{i}/cmd/#", i, 1)
    assert trie.match("devices/d42/cmd/x") == {42: 1}
    assert trie.match("devices/none/cmd/x") == {}


def test_retained_delete_and_replace() -> None:
    trie: RetainedTrie[bytes] = RetainedTrie()
    assert trie.set("a/b", b"1") is None
    assert trie.set("a/b", b"2") == b"1"
    assert len(trie) == 1 and trie.get("a/b") == b"2"
    assert trie.delete("a/b") == b"2"
    assert len(trie) == 0 and trie.get("a/b") is None and not trie._root.children


@given(st.sampled_from(["#", "a/#", "a/+", "a/+/#", "+/+", "+/#"]), st.integers(min_value=0, max_value=60))
@settings(max_examples=100, deadline=None)
def test_retained_match_tolerates_changes_between_steps(topic_filter: str, every: int) -> None:
    """The walk is resumed across loop turns: topics set and deleted meanwhile (siblings included) raise
    nothing, and every topic stored throughout is yielded exactly once."""
    trie: RetainedTrie[str] = RetainedTrie()
    stable = [f"a/{n}" for n in range(30)] + [f"a/{n}/x" for n in range(10)] + ["b/1", "$SYS/x"]
    for topic in stable:
        trie.set(topic, topic)
    seen: list[str] = []
    for step, (topic, value) in enumerate(trie.match(topic_filter)):
        assert topic == value
        seen.append(topic)
        churn = f"a/churn-{step % 7}" if step % 2 else f"a/{step % 30}/churn"
        if trie.get(churn) is None:
            trie.set(churn, churn)
        else:
            trie.delete(churn)
        if every and step % every == 0:
            trie.set(f"a/new-{step}/deep", f"a/new-{step}/deep")
    expected = {t for t in stable if filter_matches(topic_filter.split("/"), t.split("/"))}
    kept = [t for t in seen if t in set(stable)]
    assert len(kept) == len(set(kept))
    assert set(kept) == expected
