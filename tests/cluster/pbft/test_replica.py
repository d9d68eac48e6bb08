"""cluster/pbft/replica.py, driven directly (harness.py): the rules of the
protocol one by one, with the sections of Castro & Liskov (OSDI 1999) they
come from. Whole-cluster scenarios with Byzantine replicas are in test_sim.py."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from cluster.pbft.errors import PbftConfigError
from cluster.pbft.messages import (
    Checkpoint,
    Commit,
    Envelope,
    Forward,
    NewView,
    Prepare,
    PreparedProof,
    PrePrepare,
    Reply,
    Request,
    StateReply,
    ViewChange,
    batch_digest,
    decode_message,
    digest_of,
    seal,
    sign_request,
)
from cluster.pbft.replica import GENESIS_DIGEST, NULL_DIGEST, Broadcast, Execute, Replica, Send, ViewChanged
from cluster.pbft.sim import CounterApp, client_keys, replica_keys, seal_raw
from tests.cluster.pbft.harness import CLIENT, Harness, kind

# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize("changes", [
    {"replica_id": 4}, {"n": 0}, {"checkpoint_interval": 0}, {"watermark_window": 3}, {"batch_max": 0},
    {"public_keys": "short"}, {"keys": "other"}, {"view_change_timeout_ms": 0},
])
def test_impossible_configurations_are_refused(changes: dict[str, object]) -> None:
    keys = [replica_keys(i) for i in range(4)]
    args: dict[str, object] = {"replica_id": 0, "n": 4, "keys": keys[0], "public_keys": [k.public_key for k in keys],
                               "checkpoint_interval": 2}
    args.update(changes)
    if args["public_keys"] == "short":
        args["public_keys"] = [k.public_key for k in keys[:3]]
    if args["keys"] == "other":
        args["keys"] = keys[1]
    with pytest.raises(PbftConfigError):
        Replica(**args, app=CounterApp(), client_keys={})  # type: ignore[arg-type]


def test_quorums() -> None:
    for n, f, quorum in [(1, 0, 1), (4, 1, 3), (5, 1, 4), (7, 2, 5), (10, 3, 7)]:
        replica = Harness(n).replicas[0]
        assert (replica.f, replica.quorum) == (f, quorum)


# -- normal case (OSDI 4.2) ---------------------------------------------------------------------


@pytest.mark.parametrize("n", [4, 7])
def test_one_request_is_executed_everywhere_and_answered_by_all(n: int) -> None:
    h = Harness(n)
    request = h.request(b"add:5")
    effects = h.submit(0, request)
    assert [kind(e.envelope) for e in effects if isinstance(e, Broadcast)] == ["PrePrepare"]
    h.run()
    for i in range(n):
        assert h.history(i) == [(CLIENT, 1, b"add:5")]
        assert h.executed[i] == [Execute(1, (request,), (b"5",))]
    assert h.reply_results(1) == dict.fromkeys(range(n), b"5")


def test_a_backup_forwards_a_request_to_the_primary_and_starts_its_timer() -> None:
    h = Harness(4, view_change_timeout_ms=100)
    effects = h.submit(2, h.request(b"add:1"))
    assert [(type(e).__name__, e.to) for e in effects if isinstance(e, Send)] == [("Send", 0)]
    assert isinstance(decode_message(effects[0].envelope.body), Forward)  # type: ignore[union-attr]
    h.run()
    assert all(h.history(i) == [(CLIENT, 1, b"add:1")] for i in range(4))


def test_a_retried_request_is_answered_again_but_not_executed_again() -> None:
    h = Harness(4)
    request = h.request(b"add:5")
    h.submit(0, request)
    h.run()
    h.replies.clear()
    for i in range(4):
        h.submit(i, request)
    h.run()
    assert all(h.history(i) == [(CLIENT, 1, b"add:5")] for i in range(4))
    assert h.reply_results(1) == dict.fromkeys(range(4), b"5")
    # An older timestamp than the last executed one is ignored outright.
    h.replies.clear()
    h.submit(0, h.request(b"add:1", timestamp=0))
    h.run()
    assert h.replies == [] and h.apps[0].value == 5


def test_the_primary_batches_what_arrives_while_its_window_is_full() -> None:
    h = Harness(4, inflight_max=1, batch_max=3)
    for k in range(1, 6):
        h.submit(0, h.request(b"add:%d" % k))
    h.run()
    assert [len(e.requests) for e in h.executed[1]] == [1, 3, 1]
    assert [e.seq for e in h.executed[1]] == [1, 2, 3]
    assert h.apps[3].value == 15


def test_prepared_needs_2f_prepares_from_backups_and_committed_2f_plus_1_commits() -> None:
    """A backup that sees the pre-prepare but only one other prepare does not commit."""
    h = Harness(4)
    h.deliver = lambda src, dst, env: not (kind(env) == "Prepare" and dst == 1 and src == 3)
    h.down = {2}
    h.submit(0, h.request(b"add:1"))
    h.run()
    assert h.history(1) == []  # prepares from 1 and 3 would be 2f = 2, but 3's never arrived
    assert h.history(0) == h.history(3) == []  # and without 1's commit no one has 2f+1 commits


# -- what is dropped (OSDI 4.2 "accepts ... provided that") ---------------------------------------

K0, K1, K2, K3 = (replica_keys(i) for i in range(4))
ALICE = client_keys(CLIENT)


def _req(op: bytes = b"add:1", ts: int = 1) -> Request:
    return sign_request(ALICE, CLIENT, ts, op)


def _pp(seq: int = 1, view: int = 0, batch: tuple[Request, ...] | None = None) -> PrePrepare:
    batch = (_req(),) if batch is None else batch
    return PrePrepare(view, seq, batch_digest(batch), batch)


D = digest_of(b"some batch")
BAD_SIG = Envelope(0, seal(K0, 0, _pp()).body, seal(K0, 0, Prepare(0, 9, D, 0)).signature)

CASES: list[tuple[str, Callable[[], list[Envelope | bytes]]]] = [
    ("unsigned", lambda: [Envelope(0, seal(K0, 0, _pp()).body, "")]),
    ("bad_signature", lambda: [BAD_SIG]),
    ("bad_signature", lambda: [Envelope(0, seal(K2, 2, _pp()).body, seal(K2, 2, _pp()).signature)]),
    ("unknown_sender", lambda: [Envelope(7, b"x", "sig")]),
    ("from_self", lambda: [seal(K1, 1, Prepare(0, 1, D, 1))]),
    ("malformed", lambda: [b"not an envelope"]),
    ("malformed", lambda: [seal_raw(K2, 2, b"\x00 not a message")]),
    ("sender_mismatch", lambda: [seal(K2, 2, Prepare(0, 1, D, 3))]),
    ("not_primary", lambda: [seal(K2, 2, _pp())]),
    ("bad_digest", lambda: [seal(K0, 0, PrePrepare(0, 1, D, (_req(),)))]),
    ("out_of_watermark", lambda: [seal(K0, 0, _pp(seq=17))]),  # K=8, L=16
    ("out_of_watermark", lambda: [seal(K2, 2, Commit(0, 0, D, 2))]),
    ("wrong_view", lambda: [seal(K0, 0, _pp(view=8))]),
    ("conflict", lambda: [seal(K0, 0, _pp()), seal(K0, 0, _pp(batch=(_req(b"add:2"),)))]),
    ("conflict", lambda: [seal(K2, 2, Prepare(0, 1, D, 2)), seal(K2, 2, Prepare(0, 1, digest_of(b"x"), 2))]),
    ("wrong_sender", lambda: [seal(K0, 0, Prepare(0, 1, D, 0))]),
    ("bad_client_signature", lambda: [seal(K0, 0, _pp(batch=(Request(CLIENT, 1, b"add:9", _req().signature),)))]),
    ("unknown_client", lambda: [seal(K0, 0, _pp(batch=(sign_request(ALICE, "mallory", 1, b"add:1"),)))]),
    ("unexpected", lambda: [seal(K2, 2, Reply(0, 1, CLIENT, 2, b"5"))]),
    ("malformed", lambda: [seal(K2, 2, Checkpoint(3, D, 2))]),  # not a multiple of K
    ("invalid_proof", lambda: [seal(K2, 2, ViewChange(1, 8, D, (), (), 2))]),  # stable at 8 without proof
]


@pytest.mark.parametrize(("reason", "messages"), CASES, ids=[f"{r}-{i}" for i, (r, _) in enumerate(CASES)])
def test_refused_messages_are_dropped_and_counted(reason: str, messages: Callable[[], list[Envelope | bytes]]) -> None:
    replica = Harness(4, checkpoint_interval=8).replicas[1]
    for message in messages():
        replica.receive(message, 0)
    assert replica.dropped == {reason: 1}
    assert replica.last_executed == 0 and replica.view == 0 and replica.active


def test_a_request_signed_by_someone_else_is_not_accepted_from_a_client() -> None:
    replica = Harness(4).replicas[0]
    assert replica.submit(Request(CLIENT, 1, b"add:1", K1.sign(b"whatever")), 0) == []
    assert replica.submit(Request(CLIENT, 1, b"add:1"), 0) == []
    assert replica.dropped == {"bad_client_signature": 2} and replica.pending_count == 0


# -- checkpoints and garbage collection (OSDI 4.3) ----------------------------------------------


def test_checkpoints_become_stable_and_the_log_is_truncated() -> None:
    h = Harness(4, checkpoint_interval=2)
    for k in range(1, 8):
        h.submit(0, h.request(b"add:%d" % k))
        h.run()
    for replica in h.replicas:
        assert replica.last_executed == 7 and replica.stable_seq == 6 and replica.high_watermark == 6 + 4
        assert replica.log_size == 1  # only seq 7 is above the stable checkpoint
        assert all(seq > 6 for seq in replica._checkpoint_votes)
        assert sorted(replica._snapshots) == [6]
        proof = [decode_message(e.body) for e in replica._stable_proof]
        assert len({e.sender for e in replica._stable_proof}) == replica.quorum
        assert all(isinstance(cp, Checkpoint) and cp.seq == 6 for cp in proof)


def test_the_high_watermark_bounds_the_primary_until_a_checkpoint_is_stable() -> None:
    h = Harness(4, checkpoint_interval=2, watermark_window=4, status_interval_ms=50)
    h.deliver = lambda src, dst, env: kind(env) != "Checkpoint"
    for k in range(1, 11):
        h.submit(0, h.request(b"add:%d" % k))
        h.run()
    assert {r.last_executed for r in h.replicas} == {4}
    assert h.replicas[0].pending_count == 6
    h.deliver = lambda src, dst, env: True  # status messages retransmit the checkpoints
    h.advance(300)
    assert all(len(h.history(i)) == 10 for i in range(4))
    assert {r.stable_seq for r in h.replicas} == {4}
    assert [len(e.requests) for e in h.executed[1]] == [1, 1, 1, 1, 6]  # what waited went in one batch


# -- view change (OSDI 4.4, 4.5.2) -----------------------------------------------------------------


def test_a_request_committed_at_some_replicas_survives_the_view_change() -> None:
    """Replicas 1 and 2 commit r1 at seq 1; replica 3 only prepared it; then
    the primary dies. The new view must give seq 1 to r1 again."""
    h = Harness(4, view_change_timeout_ms=100)
    r1, r2 = h.request(b"add:1"), h.request(b"add:2")
    h.deliver = lambda src, dst, env: not (kind(env) == "Commit" and dst == 3)
    h.submit(0, r1)
    h.run()
    assert h.history(1) == h.history(2) == [(CLIENT, 1, b"add:1")] and h.history(3) == []
    h.down = {0}
    h.deliver = lambda src, dst, env: True
    for i in (1, 2, 3):
        h.submit(i, r2)
    h.advance(400)
    for i in (1, 2, 3):
        assert h.replicas[i].view == 1 and h.replicas[i].active
        assert h.history(i) == [(CLIENT, 1, b"add:1"), (CLIENT, 2, b"add:2")]
        assert [e.seq for e in h.executed[i]] == [1, 2]


def _cert(view: int, seq: int, batch: tuple[Request, ...], n: int = 4) -> PreparedProof:
    keys = [replica_keys(i) for i in range(n)]
    primary = view % n
    pp = PrePrepare(view, seq, batch_digest(batch), batch)
    backups = [i for i in range(n) if i != primary][: (n - 1) // 3 * 2]
    return PreparedProof(seal(keys[primary], primary, pp),
                         tuple(seal(keys[i], i, Prepare(view, seq, pp.digest, i)) for i in backups))


def _view_change(replica: int, view: int, prepared: tuple[PreparedProof, ...]) -> Envelope:
    keys = replica_keys(replica)
    return seal(keys, replica, ViewChange(view, 0, GENESIS_DIGEST, (), prepared, replica))


def test_new_view_takes_the_highest_view_certificate_and_fills_gaps_with_null_requests() -> None:
    h = Harness(4)
    a, b, c = (_req(b"add:%d" % k, ts=k) for k in (1, 2, 3))
    vcs = [
        _view_change(1, 2, (_cert(0, 1, (a,)), _cert(0, 3, (c,)))),
        _view_change(3, 2, (_cert(1, 1, (b,)),)),
        _view_change(0, 2, ()),
    ]
    new_primary = h.replicas[2]
    effects = []
    for vc in vcs:
        effects += new_primary.receive(vc, 0)
    new_views = [decode_message(e.envelope.body) for e in effects
                 if isinstance(e, Broadcast) and kind(e.envelope) == "NewView"]
    assert len(new_views) == 1
    nv = new_views[0]
    assert isinstance(nv, NewView) and nv.view == 2
    o = [decode_message(e.body) for e in nv.pre_prepares]
    assert [(p.seq, p.digest) for p in o] == [  # type: ignore[union-attr]
        (1, batch_digest((b,))), (2, NULL_DIGEST), (3, batch_digest((c,)))]
    assert new_primary.view == 2 and new_primary.active

    # Every other replica checks the new view and enters it...
    follower = Harness(4).replicas[1]
    new_view_env = next(e.envelope for e in effects if isinstance(e, Broadcast) and kind(e.envelope) == "NewView")
    out = follower.receive(new_view_env, 0)
    assert follower.view == 2 and follower.active and ViewChanged(2, 2, True) in out
    assert sum(1 for e in out if isinstance(e, Broadcast) and kind(e.envelope) == "Prepare") == 3

    # ...unless the primary left something out of O or changed it.
    for forged_o in (nv.pre_prepares[:2], (nv.pre_prepares[0], nv.pre_prepares[2]),
                     (seal(replica_keys(2), 2, _pp(seq=1, view=2, batch=(a,))), *nv.pre_prepares[1:])):
        victim = Harness(4).replicas[3]
        forged = seal(replica_keys(2), 2, NewView(2, nv.view_changes, tuple(forged_o), 2))
        assert victim.receive(forged, 0) == []
        assert victim.dropped == {"invalid_proof": 1} and victim.view == 0


def test_a_view_change_with_a_weak_certificate_is_refused() -> None:
    keys = [replica_keys(i) for i in range(4)]
    cert = _cert(0, 1, (_req(),))
    weak = PreparedProof(cert.pre_prepare, cert.prepares[:1])
    by_primary = PreparedProof(cert.pre_prepare, (seal(keys[0], 0, Prepare(0, 1, batch_digest((_req(),)), 0)),
                                                  cert.prepares[0]))
    wrong_view = _cert(1, 1, (_req(),))  # prepared "in" view 1, for a change to view 1
    for proof in (weak, by_primary, wrong_view):
        replica = Harness(4).replicas[2]
        replica.receive(_view_change(3, 1, (proof,)), 0)
        assert replica.dropped == {"invalid_proof": 1}


def test_f_plus_1_view_changes_make_a_replica_join_even_without_its_own_timeout() -> None:
    h = Harness(4)
    primary = h.replicas[0]
    assert primary.receive(_view_change(2, 1, ()), 0) == []  # one could be a faulty replica
    out = primary.receive(_view_change(3, 1, ()), 0)  # f+1 = 2: at least one is correct
    assert not primary.active and primary.view == 1
    assert [kind(e.envelope) for e in out if isinstance(e, Broadcast)] == ["ViewChange"]


def test_view_change_timeouts_double_after_each_failed_view_change() -> None:
    """n=10 (f=3) with primaries 0, 1 and 2 down: views 1 and 2 never start;
    the wait for view 2's new-view is twice the wait for view 1's."""
    timeout = 100
    h = Harness(10, view_change_timeout_ms=timeout)
    h.down = {0, 1, 2}
    request = h.request(b"add:1")
    for i in range(3, 10):
        h.submit(i, request)
    h.advance(2000)
    started = {event.view: at for at, event in h.views[5] if not event.active}
    entered = [event.view for _, event in h.views[5] if event.active]
    assert sorted(started) == [1, 2, 3] and entered == [3]
    first, second = started[2] - started[1], started[3] - started[2]
    assert first >= timeout and second >= 2 * timeout
    assert abs(second - 2 * first) <= 20  # tick granularity
    assert all(h.history(i) == [(CLIENT, 1, b"add:1")] for i in range(3, 10))


# -- state transfer (OSDI 4.3, TOCS 5.3) --------------------------------------------------------


def test_a_replica_behind_the_stable_checkpoint_fetches_and_checks_the_state() -> None:
    h = Harness(4, checkpoint_interval=2, status_interval_ms=50, fetch_timeout_ms=50)
    h.down = {3}
    for k in range(1, 8):
        h.submit(0, h.request(b"add:%d" % k))
        h.run()
    assert h.replicas[0].stable_seq == 6 and h.history(3) == []
    h.down = set()
    h.advance(400)
    assert [t.seq for t in h.transfers[3]] == [6]
    assert h.history(3) == h.history(0) and h.apps[3].value == 28
    assert [e.seq for e in h.executed[3]] == [7]  # seqs up to 6 came with the state
    # The client table came with the state: a retry of an old request is answered from it, not re-executed.
    h.replies.clear()
    h.submit(3, h.request(b"add:7", timestamp=7))
    assert h.reply_results(7) == {3: b"28"}


def test_state_that_does_not_match_the_certified_digest_is_refused() -> None:
    h = Harness(4, checkpoint_interval=2, status_interval_ms=50, fetch_timeout_ms=50)
    h.down = {3}
    for k in range(1, 4):
        h.submit(0, h.request(b"add:%d" % k))
        h.run()
    h.down = set()

    def corrupt(src: int, dst: int, env: Envelope) -> bool:
        message = decode_message(env.body)
        if isinstance(message, StateReply) and src == 0:  # replica 0 lies about the state
            lie = StateReply(message.seq, message.digest, message.snapshot + b"x", message.proof, 0)
            h.queue.appendleft((src, dst, seal(replica_keys(0), 0, lie)))
            h.deliver = lambda *_: True
            return False
        return True

    h.deliver = corrupt
    h.advance(400)
    assert h.replicas[3].dropped["bad_digest"] == 1
    assert h.history(3) == h.history(1)  # fetched again from another replica


def test_a_replica_catching_up_does_not_accuse_the_primary() -> None:
    """A quorum certified a checkpoint past what replica 3 executed (it was
    down or restarted): its request timer expiring means it is slow, not that
    the primary is faulty. It keeps its view (a view change alone would take
    it where the others never go) until it has caught up."""
    h = Harness(4, checkpoint_interval=2, status_interval_ms=50, fetch_timeout_ms=50, view_change_timeout_ms=100)
    h.down = {3}
    for k in range(1, 4):
        h.submit(0, h.request(b"add:%d" % k))
        h.run()
    assert h.replicas[0].stable_seq == 2
    behind = h.replicas[3]
    # Back up: the others' status answers bring it the stable checkpoint's
    # proof, but no state reply reaches it.
    h.down = set()
    h.deliver = lambda src, dst, env: not (dst == 3 and kind(env) == "StateReply")
    h.advance(200)
    assert behind.catching_up
    h.submit(3, h.request(b"add:9"))
    h.advance(1000)
    assert behind.catching_up and behind.view == 0 and behind.active
    assert behind.view_changes_deferred >= 5
    assert not [e for _, e in h.views[3] if e.view > 0]
    # Once the state arrives it catches up and nothing was needed from a view change.
    h.deliver = lambda src, dst, env: True
    h.advance(500)
    assert not behind.catching_up and h.history(3) == h.history(0)
    assert all(r.view == 0 for r in h.replicas)
