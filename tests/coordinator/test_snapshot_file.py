"""The backup file format (``coordinator.snapshot_file``): what it writes
reads back, and any damage (a cut, a flipped byte, bytes added, another
file) is refused naming the problem."""

from __future__ import annotations

import pytest

from coordinator import snapshot_file
from coordinator.errors import InvalidInput

HEADER = {"index": 42, "term": 3, "digest": {"index": 42, "value": "ab" * 32}, "holds": {"keys": 2}}
BODY = b"S" + bytes(range(256)) * 40


def test_a_file_reads_back_with_its_header_body_and_checksum() -> None:
    data, checksum = snapshot_file.encode(HEADER, BODY)
    snap = snapshot_file.parse(data)
    assert snap.body == BODY and snap.index == 42 and snap.checksum == checksum
    assert snap.header["holds"] == {"keys": 2} and snap.header["body_bytes"] == len(BODY)
    assert data.startswith(snapshot_file.MAGIC)


@pytest.mark.parametrize("damage, why", [
    (lambda d: d[:-1], "no checksum trailer"),
    (lambda d: d[: len(d) // 2], "no checksum trailer|truncated"),
    (lambda d: d + b"x", "no checksum trailer"),
    (lambda d: d[:100] + bytes([d[100] ^ 1]) + d[101:], "checksum mismatch"),
    (lambda d: d[:-5] + bytes([d[-5] ^ 1]) + d[-4:], "checksum mismatch"),
    (lambda d: b"X" + d[1:], "not a coordinator snapshot"),
    (lambda d: b"", "not a coordinator snapshot"),
])
def test_damage_anywhere_is_refused_naming_it(damage, why) -> None:
    data, _ = snapshot_file.encode(HEADER, BODY)
    with pytest.raises(InvalidInput, match=why) as refused:
        snapshot_file.parse(damage(data))
    assert refused.value.field == "snapshot"


def test_a_header_length_beyond_the_file_is_refused_before_reading_it() -> None:
    data, _ = snapshot_file.encode(HEADER, BODY)
    forged = snapshot_file.MAGIC + (2**31).to_bytes(4, "big") + data[snapshot_file.PREFIX_BYTES:]
    with pytest.raises(InvalidInput, match="header length"):
        snapshot_file.parse(forged)
