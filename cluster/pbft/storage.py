"""What a PBFT replica must not forget, on disk (``Replica.durable()``).

Two files in the node's directory, both owned by one ``PbftStorage``:

* ``checkpoint``: the latest stable checkpoint this replica holds the state
  of (sequence number, digest, the 2f+1 signed checkpoint messages that
  prove it, the state itself), with the view and the prepared certificates
  above it at the time it was written. Replaced atomically (temporary file,
  fsync, rename, fsync of the directory).
* ``journal``: what changed since: ``view`` records (the view and whether
  the replica entered it) and ``cert`` records (a prepared certificate: the
  signed pre-prepare and 2f signed prepares). Records are framed with their
  length and CRC32 (``cluster.journal.frame``); a torn record at the tail is
  cut off when the journal is opened. Emptied after every checkpoint write.

Both files hold msgpack records through ``coordinator.codec`` and signed
envelopes; never pickle. Nothing in them is secret (the signing key lives in
its own key file), but they are written with mode 600 like the Raft files.

Threading: ``load`` and ``save`` block (file I/O, fsync); the node calls them
through ``asyncio.to_thread``, one at a time, never concurrently.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from cluster import files
from cluster.errors import JournalCorrupt
from cluster.journal import frame, read_frames, write_file_durably
from cluster.pbft.errors import MalformedMessage
from cluster.pbft.messages import PreparedProof, PrePrepare, decode_envelope, decode_message, encode_envelope
from cluster.pbft.replica import Durable, DurableCheckpoint
from coordinator.codec import decode_record, encode_record
from coordinator.errors import InvalidInput

_VERSION = 1
_JOURNAL_MAGIC = b"COORDPBFTJ1\n"
DURABILITY = ("fsync", "none")


@dataclass(frozen=True, slots=True)
class Recovered:
    """What ``load`` found: the arguments of ``Replica.recover``."""

    view: int
    active: bool
    checkpoint: DurableCheckpoint | None
    certificates: tuple[PreparedProof, ...]


def _proof_row(proof: PreparedProof) -> list[object]:
    return [encode_envelope(proof.pre_prepare), [encode_envelope(p) for p in proof.prepares]]


def _proof_of(row: object) -> PreparedProof:
    if not isinstance(row, list) or len(row) != 2 or not isinstance(row[1], list):
        raise ValueError("not a prepared certificate")
    return PreparedProof(decode_envelope(row[0]), tuple(decode_envelope(p) for p in row[1]))


class PbftStorage:
    """The durable record of one replica in ``directory``. See the module docstring."""

    def __init__(self, directory: str, durability: str = "fsync") -> None:
        if durability not in DURABILITY:
            raise ValueError("durability must be 'fsync' or 'none'")
        self.directory = directory
        self.durability = durability
        self.checkpoint_path = os.path.join(directory, "checkpoint")
        self.journal_path = os.path.join(directory, "journal")
        self.writes = 0  # save() calls that wrote something (for tests and metrics)
        # What is on disk: the checkpoint's seq, the view, and each certificate's view by seq.
        self._seq = 0
        self._view: tuple[int, bool] = (0, True)
        self._certs: dict[int, int] = {}
        self._journal: int | None = None  # file descriptor, open for appending
        self._lock = threading.Lock()  # close() waits for a save() running in a worker thread

    # -- loading --------------------------------------------------------------------------------

    def load(self) -> Recovered | None:
        """Read what an earlier run persisted (None for a new replica) and
        open the journal for appending. Raises ``JournalCorrupt`` for files
        that are damaged beyond a torn journal tail."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        view, active, checkpoint = 0, True, None
        certs: dict[int, tuple[int, PreparedProof]] = {}
        found = False
        try:
            with open(self.checkpoint_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = None
        if data is not None:
            found = True
            try:
                version, tag, seq, digest, proof, state, view, active, cert_rows = decode_record(data)
                if version != _VERSION or tag != "pbft-checkpoint":
                    raise ValueError("not a PBFT checkpoint record")
                checkpoint = DurableCheckpoint(seq, digest, tuple(decode_envelope(e) for e in proof), state)
                for cert_view, row in cert_rows:
                    proof_ = _proof_of(row)
                    certs[_seq_of(proof_)] = (cert_view, proof_)
            except (InvalidInput, MalformedMessage, ValueError, TypeError) as exc:
                raise JournalCorrupt(f"{self.checkpoint_path}: unreadable ({type(exc).__name__})") from None
            self._seq = checkpoint.seq
        records, end, size = self._read_journal()
        for start, payload in records:
            found = True
            try:
                row = decode_record(payload)
                if row[0] == "view":
                    record_view, record_active = int(row[1]), bool(row[2])
                    if record_view >= view:  # views only grow; a record from before the checkpoint is older
                        view, active = record_view, record_active
                elif row[0] == "cert":
                    cert_view, proof_ = int(row[1]), _proof_of(row[2])
                    seq = _seq_of(proof_)
                    if seq > self._seq and cert_view >= certs.get(seq, (-1, None))[0]:
                        certs[seq] = (cert_view, proof_)
                else:
                    raise ValueError(f"unknown record {row[0]!r}")
            except (InvalidInput, MalformedMessage, ValueError, TypeError, IndexError) as exc:
                raise JournalCorrupt(f"{self.journal_path}: damaged record at byte {start} "
                                     f"({type(exc).__name__})") from None
        self._open_journal(end, size)
        certs = {seq: c for seq, c in certs.items() if seq > self._seq}
        self._view = (view, active)
        self._certs = {seq: cert_view for seq, (cert_view, _) in certs.items()}
        if not found:
            return None
        return Recovered(view, active, checkpoint, tuple(proof for _, (_, proof) in sorted(certs.items())))

    def _read_journal(self) -> tuple[list[tuple[int, bytes]], int, int]:
        try:
            with open(self.journal_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return [], 0, 0
        if not data.startswith(_JOURNAL_MAGIC):
            if len(data) < len(_JOURNAL_MAGIC) and _JOURNAL_MAGIC.startswith(data):
                return [], 0, len(data)  # torn while being created
            raise JournalCorrupt(f"{self.journal_path} is not a PBFT journal")
        records, end = read_frames(data, len(_JOURNAL_MAGIC), self.journal_path)
        return records, end, len(data)

    def _open_journal(self, end: int, size: int) -> None:
        fd = os.open(self.journal_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        if end == 0:  # new (or torn at creation): start it over
            files.truncate(fd, self.journal_path, 0)
            os.write(fd, _JOURNAL_MAGIC)
        elif end != size:
            files.truncate(fd, self.journal_path, end)  # cut the torn tail off
        os.lseek(fd, 0, os.SEEK_END)
        self._sync(fd)
        self._journal = fd

    # -- saving ---------------------------------------------------------------------------------

    def save(self, durable: Durable) -> None:
        """Persist what changed in ``durable`` since the last call (or load):
        a newer checkpoint rewrites the checkpoint file and empties the
        journal; otherwise new view and certificate records are appended.
        Durable when it returns (``fsync``). Raises ``OSError``."""
        with self._lock:
            self._save(durable)

    def _save(self, durable: Durable) -> None:
        if self._journal is None:
            raise RuntimeError("PbftStorage.save before load (or after close)")
        checkpoint = durable.checkpoint
        if checkpoint is not None and checkpoint.seq > self._seq:
            self._write_checkpoint(durable, checkpoint)
            return
        records = []
        if (durable.view, durable.active) != self._view:
            records.append(encode_record(["view", durable.view, durable.active]))
        for seq, (cert_view, proof) in durable.certificates.items():
            if self._certs.get(seq) != cert_view:
                records.append(encode_record(["cert", cert_view, _proof_row(proof)]))
        if not records:
            return
        os.write(self._journal, b"".join(frame(r) for r in records))
        self._sync(self._journal)
        self.writes += 1
        self._view = (durable.view, durable.active)
        self._certs.update({seq: cert_view for seq, (cert_view, _) in durable.certificates.items()})

    def _write_checkpoint(self, durable: Durable, checkpoint: DurableCheckpoint) -> None:
        certs = {seq: c for seq, c in durable.certificates.items() if seq > checkpoint.seq}
        record = encode_record([
            _VERSION, "pbft-checkpoint", checkpoint.seq, checkpoint.digest,
            [encode_envelope(e) for e in checkpoint.proof], checkpoint.state, durable.view, durable.active,
            [[cert_view, _proof_row(proof)] for _, (cert_view, proof) in sorted(certs.items())],
        ])
        write_file_durably(self.checkpoint_path, record, fsync=self.durability == "fsync")
        os.chmod(self.checkpoint_path, 0o600)
        # The checkpoint now holds everything the journal did: start the journal over.
        if self._journal is not None:
            files.truncate(self._journal, self.journal_path, 0)
            os.lseek(self._journal, 0, os.SEEK_SET)
            os.write(self._journal, _JOURNAL_MAGIC)
            self._sync(self._journal)
        self.writes += 1
        self._seq = checkpoint.seq
        self._view = (durable.view, durable.active)
        self._certs = {seq: cert_view for seq, (cert_view, _) in certs.items()}

    def _sync(self, fd: int) -> None:
        """fsync the journal (``fd`` is always ``journal_path``'s)."""
        if self.durability == "fsync":
            files.sync(fd, self.journal_path)

    def close(self) -> None:
        """Close the journal (after any save in progress). Idempotent; ``load`` opens it again."""
        with self._lock:
            if self._journal is not None:
                os.close(self._journal)
                self._journal = None


def _seq_of(proof: PreparedProof) -> int:
    pp = decode_message(proof.pre_prepare.body)
    if not isinstance(pp, PrePrepare):
        raise ValueError("a certificate without a pre-prepare")
    return pp.seq


__all__ = ["DURABILITY", "PbftStorage", "Recovered"]
