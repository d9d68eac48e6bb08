"""The chaos clock (``--unsafe-test-clock-control``): the wall clock shifts, monotonic does not."""

from __future__ import annotations

import pytest

from coordinator.clock import CLOCK_OFFSET_MAX_MS, OffsetClock, SystemClock, parse_clock_offset


def test_offset_moves_the_wall_clock_only() -> None:
    clock, real = OffsetClock(), SystemClock()
    clock.offset_ms = 90_000
    assert 89_000 < clock.now_ms() - real.now_ms() <= 90_100
    clock.offset_ms = -300_000
    assert -300_100 < clock.now_ms() - real.now_ms() < -299_000
    assert abs(clock.monotonic() - real.monotonic()) < 1


@pytest.mark.parametrize("text, expected", [("", 0), (" 1500\n", 1500), ("-30000", -30000)])
def test_parse_clock_offset(text: str, expected: int) -> None:
    assert parse_clock_offset(text) == expected


@pytest.mark.parametrize("text", ["abc", "1.5", str(CLOCK_OFFSET_MAX_MS + 1), "9" * 30, "1e9"])
def test_bad_offsets_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_clock_offset(text)
