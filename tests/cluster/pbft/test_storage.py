"""cluster/pbft/storage.py, and crash recovery of replicas from it
(``Replica.durable`` / ``Replica.recover``) in the deterministic harness."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cluster.errors import JournalCorrupt
from cluster.pbft.replica import Replica
from cluster.pbft.sim import CounterApp
from cluster.pbft.storage import PbftStorage
from coordinator.errors import InvariantError
from tests.cluster.pbft.harness import CLIENT, CLIENT_KEYS, Harness, kind

OPTIONS = {"checkpoint_interval": 2, "status_interval_ms": 50, "fetch_timeout_ms": 50, "view_change_timeout_ms": 100}


def _run_requests(h: Harness, count: int, start: int = 1) -> None:
    for k in range(start, start + count):
        h.submit(k % h.n, h.request(b"add:%d" % k))
        h.run()


def _crash_and_recover(h: Harness, storages: list[PbftStorage], only: tuple[int, ...] | None = None) -> None:
    """Replicas (every one, or ``only`` these) lose their memory; new ones recover from what was saved."""
    for i, storage in enumerate(storages):
        if only is not None and i not in only:
            continue
        storage.close()
        fresh = PbftStorage(storage.directory)
        recovered = fresh.load()
        assert recovered is not None
        h.apps[i] = CounterApp()
        h.replicas[i] = Replica(i, h.n, h.keys[i], h.public_keys, app=h.apps[i],
                                client_keys={CLIENT: CLIENT_KEYS.public_key}, **OPTIONS)  # type: ignore[arg-type]
        h.replicas[i].recover(recovered.view, recovered.active, recovered.checkpoint, recovered.certificates)
        storages[i] = fresh
    h.queue.clear()  # messages in flight die with the processes


def _save_all(h: Harness, storages: list[PbftStorage]) -> None:
    for replica, storage in zip(h.replicas, storages, strict=True):
        storage.save(replica.durable())


def test_a_new_directory_is_a_new_replica(tmp_path: Path) -> None:
    storage = PbftStorage(str(tmp_path / "pbft"))
    assert storage.load() is None
    assert stat.S_IMODE(os.stat(storage.journal_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(storage.directory).st_mode) == 0o700
    with pytest.raises(ValueError, match="durability"):
        PbftStorage(str(tmp_path), durability="sometimes")


def test_view_certificates_and_checkpoint_round_trip(tmp_path: Path) -> None:
    h = Harness(4, **OPTIONS)
    storage = PbftStorage(str(tmp_path / "r1"))
    storage.load()
    _run_requests(h, 3)  # seqs 1-3: a stable checkpoint at 2, a certificate for 3
    durable = h.replicas[1].durable()
    assert durable.checkpoint is not None and durable.checkpoint.seq == 2 and list(durable.certificates) == [3]
    storage.save(durable)
    assert stat.S_IMODE(os.stat(storage.checkpoint_path).st_mode) == 0o600
    writes = storage.writes
    storage.save(durable)  # nothing new: nothing written
    assert storage.writes == writes
    storage.close()
    again = PbftStorage(str(tmp_path / "r1"))
    recovered = again.load()
    assert recovered is not None and recovered.view == 0 and recovered.active
    assert recovered.checkpoint == durable.checkpoint
    assert recovered.certificates == (durable.certificates[3][1],)
    again.close()


def test_the_journal_keeps_what_came_after_the_checkpoint_and_a_torn_tail_is_cut(tmp_path: Path) -> None:
    h = Harness(4, **OPTIONS)
    storage = PbftStorage(str(tmp_path / "r2"))
    storage.load()
    _run_requests(h, 2)
    storage.save(h.replicas[2].durable())  # checkpoint at 2: the journal starts over
    size_after_checkpoint = os.path.getsize(storage.journal_path)
    _run_requests(h, 1, start=3)
    storage.save(h.replicas[2].durable())  # the certificate for 3 goes to the journal
    assert os.path.getsize(storage.journal_path) > size_after_checkpoint
    storage.close()
    with open(storage.journal_path, "ab") as f:
        f.write(b"\x00\x00\x01\x00torn")  # a crash in the middle of an append
    recovered = PbftStorage(str(tmp_path / "r2")).load()
    assert recovered is not None and [c.pre_prepare.sender for c in recovered.certificates] == [0]
    assert recovered.checkpoint is not None and recovered.checkpoint.seq == 2


def test_damage_before_the_tail_is_refused(tmp_path: Path) -> None:
    h = Harness(4, **OPTIONS)
    storage = PbftStorage(str(tmp_path / "r3"))
    storage.load()
    h.submit(0, h.request(b"add:1"))
    h.run()
    storage.save(h.replicas[1].durable())
    _run_requests(h, 1, start=2)
    h.replicas[1].durable()
    storage.close()
    data = bytearray(Path(storage.journal_path).read_bytes())
    data[20] ^= 0xFF  # inside the first record, with a valid one after it
    data += data[12:]
    Path(storage.journal_path).write_bytes(bytes(data))
    with pytest.raises(JournalCorrupt):
        PbftStorage(str(tmp_path / "r3")).load()
    Path(storage.journal_path).write_bytes(b"something else entirely")
    with pytest.raises(JournalCorrupt, match="not a PBFT journal"):
        PbftStorage(str(tmp_path / "r3")).load()
    Path(storage.journal_path).unlink()
    Path(storage.checkpoint_path).write_bytes(b"R\x93garbage")
    with pytest.raises(JournalCorrupt, match="checkpoint"):
        PbftStorage(str(tmp_path / "r3")).load()


def test_a_recovered_replica_is_muted_in_its_view_and_checked() -> None:
    h = Harness(4, **OPTIONS)
    _run_requests(h, 3)
    durable = h.replicas[2].durable()
    fresh = Replica(2, 4, h.keys[2], h.public_keys, app=CounterApp(), client_keys={CLIENT: CLIENT_KEYS.public_key},
                    **OPTIONS)  # type: ignore[arg-type]
    certs = tuple(proof for _, proof in durable.certificates.values())
    fresh.recover(durable.view, durable.active, durable.checkpoint, certs)
    assert fresh.muted and fresh.view == 0 and fresh.stable_seq == 2 and fresh.last_executed == 2
    assert fresh.app.value == 3  # type: ignore[attr-defined]  # add:1 + add:2 from the checkpoint
    with pytest.raises(InvariantError, match="already ran"):
        fresh.recover(durable.view, durable.active, durable.checkpoint, certs)
    forged = Replica(2, 4, h.keys[2], h.public_keys, app=CounterApp(), client_keys={CLIENT: CLIENT_KEYS.public_key},
                     **OPTIONS)  # type: ignore[arg-type]
    assert durable.checkpoint is not None
    bad = type(durable.checkpoint)(durable.checkpoint.seq, bytes(32), durable.checkpoint.proof,
                                   durable.checkpoint.state)
    with pytest.raises(InvariantError, match="do not check"):
        forged.recover(durable.view, durable.active, bad, certs)


@pytest.mark.parametrize("extra", [0, 1])
def test_every_replica_crashing_at_once_loses_nothing_that_was_executed(tmp_path: Path, extra: int) -> None:
    """All four replicas crash after executing requests past their last
    stable checkpoint (3 = checkpoint 2 + one; 4 = exactly a checkpoint when
    extra=1 adds a request). They recover from disk, muted in view 0: a new
    request makes the backups' timers change the view, the new primary
    re-proposes the prepared requests at their sequence numbers, and every
    replica ends with the same history that holds everything executed before."""
    h = Harness(4, **OPTIONS)
    storages = [PbftStorage(str(tmp_path / f"r{i}")) for i in range(4)]
    for storage in storages:
        storage.load()
    _run_requests(h, 3 + extra)
    _save_all(h, storages)
    before = h.history(0)
    assert len(before) == 3 + extra and all(h.history(i) == before for i in range(4))
    _crash_and_recover(h, storages)
    assert all(r.muted for r in h.replicas)
    late = h.request(b"add:100")
    for i in range(1, 4):  # the client's request, retried to every replica
        h.submit(i, late)
    h.advance(3000)
    after = h.history(0)
    assert after[: len(before)] == before and after[-1][2] == b"add:100"
    assert all(h.history(i) == after for i in range(4))
    assert all(r.view >= 1 and not r.muted for r in h.replicas)
    assert h.apps[0].value == sum(range(1, 4 + extra)) + 100


def test_one_replica_recovering_alone_catches_up_without_a_view_change(tmp_path: Path) -> None:
    """A single replica crashes and recovers while the others go on in view 0:
    muted there, it still executes what they commit (or fetches it at the next
    checkpoint) and nobody changes the view on its account."""
    h = Harness(4, **OPTIONS)
    storages = [PbftStorage(str(tmp_path / f"r{i}")) for i in range(4)]
    for storage in storages:
        storage.load()
    _run_requests(h, 3)
    storages[3].save(h.replicas[3].durable())
    _crash_and_recover(h, storages, only=(3,))
    _run_requests(h, 6, start=4)
    h.advance(500)
    assert h.history(3) == h.history(0) and len(h.history(0)) == 9
    assert all(r.view == 0 for r in h.replicas) and h.replicas[3].muted


def test_a_muted_replica_votes_no_more_in_its_view_yet_executes_what_the_others_commit() -> None:
    """Replica 2 may have voted in view 0 before its crash (a prepare is not
    persisted): after recovering it sends no prepare or commit in view 0, so
    it cannot contradict a vote it forgot, and still executes the requests."""
    h = Harness(4, **OPTIONS)
    h.replicas[2].recover(0, True, None, ())
    sent: list[tuple[int, str]] = []
    h.deliver = lambda src, dst, env: sent.append((src, kind(env))) or True
    _run_requests(h, 3)
    assert all(h.history(i) == h.history(0) for i in range(4)) and len(h.history(0)) == 3
    assert not [k for src, k in sent if src == 2 and k in ("Prepare", "Commit", "PrePrepare")]
    assert [k for src, k in sent if src == 1].count("Prepare") == 3 * 3  # the others vote as usual (to 3 peers)
