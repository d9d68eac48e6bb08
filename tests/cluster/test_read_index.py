"""ReadIndex rounds (cluster.read_index): which answers confirm which reads.

The rounds are driven by hand here; tests/integration/test_read_index_cluster.py
runs them on a real cluster."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from cluster.read_index import REFUSED, UNAVAILABLE, LeaderView, ReadRounds

PEERS = frozenset({"b", "c"})


def view(term: int = 3, commit: int = 10, *, leader: bool = True, committed: bool = True,
         voters: frozenset[str] = PEERS) -> LeaderView:
    return LeaderView(leader=leader, term=term, commit_index=commit, term_committed=committed, voters=voters)


class Read:
    """A waiter that remembers how it was finished."""

    def __init__(self, rounds: ReadRounds) -> None:
        self.outcome: tuple[Any, ...] | None = None
        rounds.request(self)

    def __call__(self, index: int | None, kind: str | None, why: str | None) -> None:
        if self.outcome is not None:
            raise AssertionError(f"finished twice: {self.outcome} then {(index, kind, why)}")
        self.outcome = (index, kind)


def test_a_majority_answering_the_round_confirms_the_index_taken_when_it_started() -> None:
    rounds = ReadRounds(timeout_s=2.0)
    read = Read(rounds)
    assert rounds.on_tick(view(commit=10), now=0.0) is True  # the caller sends append_entries now
    stamp = rounds.stamp()
    assert not rounds.on_tick(view(commit=12), now=0.1) and read.outcome is None  # nobody answered yet
    rounds.on_answer("b", 3, stamp)
    rounds.on_tick(view(commit=12), now=0.2)
    assert read.outcome == (10, None)  # one follower and the leader: a majority of three


def test_answers_to_messages_sent_before_the_round_do_not_count() -> None:
    """An answer stamped with an older round answers a message sent before
    the read began: also when it arrives after the round started, and also
    when it arrives on a connection opened since (the stamp, not the
    connection, says what it answers)."""
    rounds = ReadRounds(timeout_s=2.0)
    first = Read(rounds)
    rounds.on_tick(view(), now=0.0)
    old_stamp = rounds.stamp()
    rounds.on_answer("b", 3, old_stamp)
    rounds.on_tick(view(), now=0.1)
    assert first.outcome == (10, None)

    second = Read(rounds)
    assert rounds.on_tick(view(commit=11), now=0.2)
    rounds.on_answer("b", 3, old_stamp)  # late answers to the old round, say after a reconnect
    rounds.on_answer("c", 3, old_stamp)
    rounds.on_tick(view(commit=11), now=0.3)
    assert second.outcome is None
    rounds.on_answer("c", 3, rounds.stamp())
    rounds.on_tick(view(commit=11), now=0.4)
    assert second.outcome == (11, None)


def test_a_read_that_began_after_a_round_was_sent_waits_for_the_next_round() -> None:
    rounds = ReadRounds(timeout_s=2.0)
    early = Read(rounds)
    assert rounds.on_tick(view(commit=10), now=0.0)
    round_one = rounds.stamp()
    late = [Read(rounds) for _ in range(3)]  # began while round one was in flight
    assert not rounds.on_tick(view(commit=11), now=0.1)  # no second round while one is in flight
    rounds.on_answer("b", 3, round_one)
    assert rounds.on_tick(view(commit=11), now=0.2)  # round one settles, round two starts at once
    assert early.outcome == (10, None)
    assert all(r.outcome is None for r in late)  # round one's answers are not theirs
    assert rounds.stamp() == round_one + 1
    rounds.on_answer("c", 3, round_one + 1)
    rounds.on_tick(view(commit=11), now=0.3)
    assert all(r.outcome == (11, None) for r in late)  # the three shared one round
    assert rounds.rounds == 2


def test_answers_of_another_term_do_not_count() -> None:
    rounds = ReadRounds(timeout_s=2.0)
    read = Read(rounds)
    rounds.on_tick(view(term=3), now=0.0)
    rounds.on_answer("b", 2, rounds.stamp())  # an answer to a message of an older term
    rounds.on_tick(view(term=3), now=0.1)
    assert read.outcome is None


def test_a_deposed_leader_fails_the_read_as_refused() -> None:
    rounds = ReadRounds(timeout_s=2.0)
    read = Read(rounds)
    rounds.on_tick(view(term=3), now=0.0)
    rounds.on_answer("b", 3, rounds.stamp())
    rounds.on_tick(view(term=4), now=0.1)  # a higher term reached this node first: deposed
    assert read.outcome == (None, REFUSED)

    other = Read(rounds)
    rounds.on_tick(view(term=4), now=0.2)
    rounds.step_down()  # no longer the leader
    assert other.outcome == (None, REFUSED)


def test_a_leader_without_a_majority_fails_the_read_as_unavailable_after_the_timeout() -> None:
    rounds = ReadRounds(timeout_s=2.0)
    read = Read(rounds)
    rounds.on_tick(view(), now=0.0)
    rounds.on_tick(view(), now=1.9)
    assert read.outcome is None
    rounds.on_tick(view(), now=2.1)
    assert read.outcome == (None, UNAVAILABLE)


def test_five_members_need_two_followers() -> None:
    rounds = ReadRounds(timeout_s=2.0)
    read = Read(rounds)
    five = frozenset({"b", "c", "d", "e"})
    rounds.on_tick(view(voters=five), now=0.0)
    rounds.on_answer("b", 3, rounds.stamp())
    rounds.on_tick(view(voters=five), now=0.1)
    assert read.outcome is None
    rounds.on_answer("e", 3, rounds.stamp() + 5)  # a later round's stamp answers a message sent later still
    rounds.on_tick(view(voters=five), now=0.2)
    assert read.outcome == (10, None)


def test_no_round_before_the_leader_committed_an_entry_of_its_term_or_when_not_leading() -> None:
    rounds = ReadRounds(timeout_s=2.0)
    read = Read(rounds)
    assert not rounds.on_tick(view(committed=False), now=0.0)
    assert read.outcome == (None, REFUSED)
    follower = Read(rounds)
    assert not rounds.on_tick(view(leader=False), now=0.0)
    assert follower.outcome == (None, REFUSED)
    assert rounds.rounds == 0


def test_a_cluster_of_one_confirms_at_once() -> None:
    rounds = ReadRounds(timeout_s=2.0)
    read = Read(rounds)
    assert not rounds.on_tick(view(voters=frozenset()), now=0.0)
    assert read.outcome == (10, None)


# -- the stamps on the wire (_SyncingTransport, pysyncobj's send and handler replaced) --

@pytest.fixture
def journal(tmp_path: Any) -> Iterator[Any]:
    from cluster.journal import DurableJournal

    journal = DurableJournal(str(tmp_path / "raft.journal"))
    yield journal
    journal._destroy()


def _transport(journal: Any, monkeypatch: Any, handler: Any) -> tuple[Any, list, ReadRounds]:
    from pysyncobj.transport import TCPTransport

    from cluster import raft_pysyncobj as raft

    sent: list[tuple[str, dict]] = []
    monkeypatch.setattr(TCPTransport, "send", lambda self, node, message: sent.append((node.id, message)) or True)
    monkeypatch.setattr(TCPTransport, "_onMessageReceived", lambda self, node, message: handler(self, node, message))
    rounds = ReadRounds(timeout_s=2.0)
    transport = object.__new__(raft._SyncingTransport)
    transport._journal = journal
    transport._relays = {}
    transport._rounds = rounds
    return transport, sent, rounds


def _node(address: str) -> Any:
    from pysyncobj.node import TCPNode

    return TCPNode(address)


def test_appends_leave_stamped_and_the_answer_sent_while_handling_one_carries_its_stamp(journal,
                                                                                         monkeypatch) -> None:
    """What pysyncobj answers from inside its handler for a stamped append
    carries the stamp and the append's term; anything else it sends does not."""
    def follower(transport: Any, node: Any, message: dict) -> None:  # pysyncobj's handler, in short
        if message["type"] == "append_entries":
            transport.send(node, {"type": "next_node_idx", "next_node_idx": 5, "reset": False, "success": True})
            transport.send(_node("127.0.0.1:9"), {"type": "next_node_idx", "next_node_idx": 1, "reset": False,
                                                  "success": True})  # (never happens) another node: no stamp

    transport, sent, rounds = _transport(journal, monkeypatch, follower)
    rounds.seq = 7
    leader = _node("127.0.0.1:1")
    transport.send(leader, {"type": "append_entries", "term": 3, "entries": []})
    assert sent[-1][1]["ri"] == 7  # what a leader sends carries its latest round
    sent.clear()
    transport._onMessageReceived(leader, {"type": "append_entries", "term": 4, "ri": 9, "entries": [],
                                          "commit_index": 1})
    assert sent[0] == ("127.0.0.1:1", {"type": "next_node_idx", "next_node_idx": 5, "reset": False,
                                       "success": True, "ri": 9, "ri_term": 4})
    assert "ri" not in sent[1][1]
    transport.send(leader, {"type": "next_node_idx", "next_node_idx": 6, "reset": False, "success": True})
    assert "ri" not in sent[-1][1]  # sent outside the handler: it answers no stamped append


def test_a_stamped_answer_reaches_the_rounds(journal, monkeypatch) -> None:
    delivered: list[dict] = []
    transport, _, rounds = _transport(journal, monkeypatch, lambda t, node, message: delivered.append(message))
    read = Read(rounds)
    peers = frozenset({"127.0.0.1:2", "127.0.0.1:3"})
    rounds.on_tick(view(term=4, voters=peers), now=0.0)
    transport._onMessageReceived(_node("127.0.0.1:2"), {"type": "next_node_idx", "next_node_idx": 2, "reset": True,
                                              "success": False, "ri": rounds.stamp(), "ri_term": 4})
    assert delivered and delivered[0]["type"] == "next_node_idx"  # pysyncobj still sees it
    rounds.on_tick(view(term=4, voters=peers), now=0.1)
    assert read.outcome == (10, None)  # a nextNodeIdx mismatch is an answer in our term all the same
