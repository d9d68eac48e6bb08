"""devcluster.progress: plain lines for logs, a bar on a terminal."""

from __future__ import annotations

import io

from devcluster.progress import Progress, Steps


def test_without_a_terminal_it_prints_a_line_at_most_every_interval() -> None:
    out = io.StringIO()
    with Progress("run", 60, every_s=3600, stream=out, bar=False) as progress:
        progress.update(1.0, "ok 1")
        progress.update(2.0, "ok 2")  # within the interval: no second line
    assert out.getvalue() == "      1s  ok 1\n" and progress.lines == 1


def test_every_update_is_a_line_when_the_interval_is_zero() -> None:
    out = io.StringIO()
    progress = Progress("run", None, every_s=0, stream=out, bar=False)
    for n in range(3):
        progress.update(float(n), f"step {n}")
    assert out.getvalue().splitlines() == ["      0s  step 0", "      1s  step 1", "      2s  step 2"]


def test_a_bar_writes_to_stderr_and_not_to_the_stream(capsys) -> None:  # type: ignore[no-untyped-def]
    out = io.StringIO()
    with Progress("run", 10, stream=out, bar=True) as progress:
        progress.update(4.0, "half")
    assert out.getvalue() == "" and progress.lines == 0
    err = capsys.readouterr().err
    assert "run" in err and "half" in err


def test_steps_print_what_finished_and_how_long_is_left() -> None:
    out = io.StringIO()
    with Steps("cells", 3, stream=out, bar=False) as steps:
        steps.step("embedded, round 1")
        steps.step("kafka direct, round 1")
    lines = out.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == ["  [1/3] embedded, round 1", "  [2/3] kafka direct, round 1"]
    assert all("s left)" in line for line in lines)
