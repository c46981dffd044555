"""Subject names: every stream has its own tree, so wildcards deliver only what they mean."""

from __future__ import annotations

import pytest

from infermesh.proto import codec
from infermesh.proto.messages import SnapshotRequest
from infermesh.proto.subjects import Subjects


def matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: ``*`` one token, ``>`` one or more trailing tokens."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


def test_snapshot_requests_are_not_in_the_kv_stream_tree() -> None:
    s = Subjects("im")
    assert s.kv_snapshot("sim-0") == "im.snapshot.sim-0"
    assert not matches(s.kv_all, s.kv_snapshot("sim-0"))
    assert matches(s.kv_all, s.kv("default", "sim-0"))
    assert matches(s.kv_snapshot_all, s.kv_snapshot("sim-0"))
    assert not matches(s.kv_snapshot_all, s.kv("default", "sim-0"))
    # A pool may now be called "snapshot": its stream is an ordinary KV stream.
    assert s.parse_kv(s.kv("snapshot", "p")) == ("snapshot", "p")
    assert s.parse_kv("im.snapshot.p") is None
    assert s.parse_kv("im.kv.a.b.c") is None


def test_the_codec_knows_the_message_of_each_subject() -> None:
    s = Subjects("im")
    assert codec.message_type_for_subject(s, s.kv_snapshot("x")) is SnapshotRequest
    assert codec.message_type_for_subject(s, "other.kv.a.b") is None


@pytest.mark.parametrize("bad", ["a.b", "a b", "a*", ">", ""])
def test_pod_and_pool_names_are_single_tokens(bad: str) -> None:
    with pytest.raises(ValueError):
        Subjects("im").kv_snapshot(bad)
