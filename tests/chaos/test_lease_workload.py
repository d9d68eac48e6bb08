"""check_leases on hand-made lease histories (chaos/lease_workload.py)."""

from __future__ import annotations

from chaos.lease_workload import check_leases

S = 1_000_000_000  # ns


def _history(*events: dict) -> list[dict]:
    return [{"type": "lease", "f": "config", "ttl_s": 3.0, "bound_s": 4.0},
            *({"type": "lease", **e} for e in events)]


def test_a_quitter_expiring_in_time_is_valid() -> None:
    verdict = check_leases(_history(
        {"f": "renew", "agent": "chaos-quitter-x-0", "sent": 0, "done": 1},
        {"f": "renew", "agent": "chaos-quitter-x-0", "sent": 1 * S, "done": 1 * S + 10},
        {"f": "stop", "agent": "chaos-quitter-x-0", "sent": 2 * S},
        {"f": "gone", "agent": "chaos-quitter-x-0", "sent": 4 * S, "done": 4 * S + 100, "status": 404}))
    assert verdict["valid"] is True and verdict["quitter_expiry_s"] == [3.0]


def test_early_late_and_missing_expiries_are_problems() -> None:
    verdict = check_leases(_history(
        {"f": "renew", "agent": "chaos-quitter-x-0", "sent": 0, "done": 1},
        {"f": "stop", "agent": "chaos-quitter-x-0", "sent": 1},
        {"f": "gone", "agent": "chaos-quitter-x-0", "sent": 2 * S, "done": 2 * S, "status": 404},
        {"f": "renew", "agent": "chaos-quitter-x-1", "sent": 0, "done": 1},
        {"f": "stop", "agent": "chaos-quitter-x-1", "sent": 1},
        {"f": "gone", "agent": "chaos-quitter-x-1", "sent": 9 * S, "done": 9 * S, "status": 404},
        {"f": "renew", "agent": "chaos-quitter-x-2", "sent": 0, "done": 1},
        {"f": "stop", "agent": "chaos-quitter-x-2", "sent": 1}))
    kinds = sorted(p["kind"] for p in verdict["problems"])
    assert kinds == ["expired early", "expired late", "never expired after it stopped"]
    assert verdict["valid"] is False


def test_a_steady_lapse_counts_and_is_a_problem_only_when_nothing_excuses_it() -> None:
    events = _history(
        {"f": "renew", "agent": "chaos-steady-x", "sent": 0, "done": 1},
        {"f": "gone", "agent": "chaos-steady-x", "sent": 5 * S, "done": 5 * S, "status": 404},
        {"f": "renew", "agent": "chaos-steady-x", "sent": 5 * S + 10, "done": 5 * S + 20})
    lenient = check_leases(events)
    assert lenient["valid"] is True and lenient["steady_lapses"] == 1
    strict = check_leases(events, steady_must_survive=True)
    assert strict["valid"] is False and strict["problems"][0]["kind"] == "steady agent expired"


def test_no_lease_events_is_no_verdict() -> None:
    assert check_leases([])["valid"] is None
