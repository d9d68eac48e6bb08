"""The chaos clock (``--unsafe-test-clock-control``): the wall clock shifts, monotonic does not."""

from __future__ import annotations

import pytest

from coordinator.clock import (
    CLOCK_OFFSET_MAX_MS,
    ManualClock,
    OffsetClock,
    SteadyClock,
    SystemClock,
    parse_clock_offset,
)


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


def test_steady_clock_follows_the_wall_clock_and_small_corrections() -> None:
    wall = ManualClock()
    clock = SteadyClock(wall)
    start = clock.now_ms()
    wall.advance(2.0)
    assert clock.now_ms() == start + 2_000
    wall.step_wall(400)  # within step_max_ms: followed
    assert clock.now_ms() == start + 2_400 and clock.jumps == 0


@pytest.mark.parametrize("jump_ms", [60_000, -60_000, 3_600_000])
def test_steady_clock_does_not_take_a_step_at_once_and_slews_towards_it(jump_ms: int) -> None:
    wall = ManualClock()
    clock = SteadyClock(wall, slew=0.05)
    start = clock.now_ms()
    wall.step_wall(jump_ms)
    wall.advance(10.0)
    # ten real seconds later: ten seconds on, plus or minus 5 % of them, whatever the wall clock says
    assert clock.now_ms() == start + 10_000 + (500 if jump_ms > 0 else -500)
    assert clock.jumps == 1 and clock.absorbing
    previous = clock.now_ms()
    for _ in range(100):  # never back, never more than 105 % of real time
        wall.advance(1.0)
        now = clock.now_ms()
        assert 950 <= now - previous <= 1_050
        previous = now
    if abs(jump_ms) == 60_000:  # 60 s at 5 % is absorbed within 1200 s of real time
        for _ in range(1_200):
            wall.advance(1.0)
            clock.now_ms()
        assert clock.now_ms() == wall.now_ms() and not clock.absorbing and clock.offset_ms == 0


def test_steady_clock_a_jump_undone_leaves_no_trace() -> None:
    wall = ManualClock()
    clock = SteadyClock(wall)
    start = clock.now_ms()
    wall.step_wall(120_000)
    wall.advance(5.0)
    clock.now_ms()
    wall.step_wall(-120_000)  # the clock-skew nemesis heals
    wall.advance(5.0)
    assert abs(clock.now_ms() - (start + 10_000)) <= 1_000 and clock.jumps == 1
