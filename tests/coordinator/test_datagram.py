"""The heartbeat datagram (``coordinator.datagram``): layout, MACs, and
everything that is not a datagram of this lease's key decoding to None."""

from __future__ import annotations

import pytest

from coordinator import crypto, datagram
from coordinator.commands.agents import HEALTH_STATES
from coordinator.datagram import Ack, Beat

K_HB = crypto.derived_key("a-cluster-secret-of-some-length", crypto.KEY_HEARTBEAT)
KEY = datagram.lease_key(K_HB, 42)


def test_a_beat_round_trips_at_the_fixed_size() -> None:
    for health in (None, *HEALTH_STATES):
        data = datagram.encode_beat(KEY, Beat(42, 1_765_000_000_123, health))
        assert len(data) == datagram.SIZE == 34
        assert data[0] == datagram.VERSION
        assert datagram.peek_lease(data) == 42
        assert datagram.decode_beat((KEY,), data) == Beat(42, 1_765_000_000_123, health)


def test_the_lease_key_is_per_lease_and_per_secret() -> None:
    assert datagram.lease_key(K_HB, 43) != KEY
    other = crypto.derived_key("another-cluster-secret-here", crypto.KEY_HEARTBEAT)
    assert datagram.lease_key(other, 42) != KEY
    assert crypto.derived_key("a-cluster-secret-of-some-length", crypto.KEY_GOSSIP) != K_HB


def test_anything_else_decodes_to_nothing() -> None:
    data = datagram.encode_beat(KEY, Beat(42, 7))
    flipped = [data[:i] + bytes([data[i] ^ 1]) + data[i + 1:] for i in range(len(data))]
    assert all(datagram.decode_beat((KEY,), d) is None for d in flipped)  # every byte is covered
    assert datagram.decode_beat((KEY,), data[:-1]) is None  # truncated
    assert datagram.decode_beat((KEY,), data + b"\0") is None  # longer
    assert datagram.decode_beat((KEY,), bytes(200)) is None
    assert datagram.decode_beat((KEY,), b"") is None
    assert datagram.decode_beat((datagram.lease_key(K_HB, 41),), data) is None  # another lease's key
    assert datagram.peek_lease(bytes([2]) + data[1:]) is None  # another version
    assert datagram.peek_lease(data[:1] + bytes([len(HEALTH_STATES) + 1]) + data[2:]) is None  # no such health
    # an ack is not a beat (other label), nor a beat an ack
    ack = datagram.encode_ack(KEY, Ack(42, 7, datagram.OK))
    assert datagram.decode_beat((KEY,), ack) is None
    assert datagram.decode_ack(KEY, data) is None


def test_any_of_the_accepted_keys_verifies() -> None:
    old = datagram.lease_key(crypto.derived_key("the-previous-cluster-secret", crypto.KEY_HEARTBEAT), 42)
    data = datagram.encode_beat(old, Beat(42, 9))
    assert datagram.decode_beat((KEY,), data) is None
    assert datagram.decode_beat((KEY, old), data) == Beat(42, 9)


def test_an_ack_round_trips_and_is_never_larger_than_a_beat() -> None:
    for status in datagram.STATUSES:
        data = datagram.encode_ack(KEY, Ack(42, 7, status))
        assert len(data) == datagram.SIZE
        assert datagram.decode_ack(KEY, data) == Ack(42, 7, status)
    data = datagram.encode_ack(KEY, Ack(42, 7, datagram.OK))
    assert datagram.decode_ack(datagram.lease_key(K_HB, 41), data) is None
    assert datagram.decode_ack(KEY, data[:1] + bytes([9]) + data[2:]) is None


def test_out_of_range_is_refused_when_encoding() -> None:
    with pytest.raises(ValueError):
        datagram.encode_beat(KEY, Beat(42, 2**64))
    with pytest.raises(ValueError):
        datagram.encode_beat(KEY, Beat(-1, 1))
    with pytest.raises(ValueError):
        datagram.encode_beat(KEY, Beat(42, 1, "asleep"))
