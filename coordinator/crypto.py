"""The project's one use of pynacl: agents' Ed25519 identities, request
signatures (``verify``, also used by the HTTP API to check a signed
request), and end-to-end sealing of agent messages: encrypted for chosen
agents, signed by the sender, so the cluster routes a sealed payload
without reading it (sealing and opening run in the agent, client side).

Functions are pure apart from the OS random source and
``AgentKeys.save``/``load``, keep no shared state, log nothing and are
safe to call from any thread. They do CPU work only, never I/O, except
``save`` and ``load``, which do blocking file I/O: call those from a
thread, not from the event loop.

An agent's identity is an Ed25519 key pair. It signs with the Ed25519 key
and opens sealed keys with the X25519 key derived from the same seed
(libsodium's ``crypto_sign_ed25519_sk_to_curve25519``), so one public key,
the one an agent registers, serves both.

Envelope, version 1 (plain JSON; it is a bus message's ``payload``)::

    {"sealed": 1,
     "alg": "x25519-xsalsa20poly1305+ed25519",
     "sender": <sender agent id>,
     "keys": {<recipient agent id>: b64(SealedBox(recipient X25519 key).encrypt(K))},
     "ciphertext": b64(SecretBox(K).encrypt(plaintext)),   # 24-byte nonce first
     "sig": b64(Ed25519 detached signature by the sender)}

- ``K`` is a fresh random 32-byte key per message.
- ``plaintext`` is ``canonical_json({"payload": payload, "sender": sender})``.
  The sender id sits inside the ciphertext as well as outside it. The
  signature only proves who *sent* the envelope, not who *wrote* the sealed
  content. Without the inner copy, anyone who sees an envelope (the
  cluster, say) could replace ``sender`` and ``sig`` with their own, and
  the recipient would read the real author's message as theirs.
- ``sig`` signs ``SIGNING_CONTEXT`` + the canonical JSON of every other field
  (sorted keys, no spaces, ASCII only). Swapping the ciphertext, a sealed
  key, the sender or the recipient list therefore breaks it.
- base64 is standard, padded and canonical: there is exactly one accepted
  encoding of each value.

``open_sealed`` checks, in order: shape and version, field bounds, the
signature, then opens our key, then decrypts. Nothing is decrypted before
the signature checks out.

Out of scope:

- Replay. An envelope can be delivered twice; put a message id in the
  payload and drop duplicates.
- Key distribution. Public keys come from the registry, which the cluster
  serves, so a hostile cluster could substitute keys. Pin them out of band
  where that matters.
- Hiding who talks to whom, and how much. Recipient ids and the payload's
  size are visible.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import os
import stat
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.secret
import nacl.signing
import nacl.utils

from coordinator.errors import CoordinatorError

VERSION = 1
ALG = "x25519-xsalsa20poly1305+ed25519"
# Domain separation: an agent's signature over an envelope can never double
# as its signature over anything else it signs with the same key.
SIGNING_CONTEXT = b"coordinator/sealed/v1\n"

MAX_RECIPIENTS = 1000
MAX_CIPHERTEXT_BYTES = 1 << 20
MAX_AGENT_ID_LEN = 256

SEED_BYTES = 32
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
_SYMMETRIC_KEY_BYTES = nacl.secret.SecretBox.KEY_SIZE
# SealedBox output: an ephemeral X25519 public key and a MAC (48 bytes), then the key.
_SEALED_KEY_BYTES = nacl.bindings.crypto_box_SEALBYTES + _SYMMETRIC_KEY_BYTES
_CIPHERTEXT_OVERHEAD = nacl.secret.SecretBox.NONCE_SIZE + nacl.secret.SecretBox.MACBYTES
MAX_PLAINTEXT_BYTES = MAX_CIPHERTEXT_BYTES - _CIPHERTEXT_OVERHEAD

_FIELDS = ("sealed", "alg", "sender", "keys", "ciphertext", "sig")
_KEY_FILE_VERSION = 1
_KEY_FILE_TYPE = "ed25519-seed"
_MAX_KEY_FILE_BYTES = 4096


class SealError(CoordinatorError):
    """A sealed message that cannot be made or opened, or an unusable key file.

    The message starts with the reason: ``not sealed``, ``unsupported
    version``, ``malformed <field>``, ``bad signature by <sender>``, ``not a
    recipient`` or ``tampered``. ``field`` names the offending field when
    there is one. Messages never contain key material or plaintext.
    """

    code = "seal"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.field = field


# -- encodings ----------------------------------------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _b64_len(size: int) -> int:
    return 4 * ((size + 2) // 3)


def _unb64(value: Any, field: str, *, size: int | None = None, min_size: int = 0, max_size: int | None = None) -> bytes:
    """Decode canonical padded standard base64. What is far too long is refused
    before decoding (the string's length bounds the bytes' length)."""
    if not isinstance(value, str):
        raise SealError(f"malformed {field}: must be a base64 string", field)
    limit = size if size is not None else max_size
    if limit is not None and len(value) > _b64_len(limit):
        raise SealError(f"malformed {field}: longer than {limit} bytes", field)
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise SealError(f"malformed {field}: not base64", field) from None
    if _b64(raw) != value:
        raise SealError(f"malformed {field}: not canonical padded base64", field)
    if size is not None and len(raw) != size:
        raise SealError(f"malformed {field}: must be {size} bytes, not {len(raw)}", field)
    if len(raw) < min_size:
        raise SealError(f"malformed {field}: shorter than {min_size} bytes", field)
    if max_size is not None and len(raw) > max_size:
        raise SealError(f"malformed {field}: longer than {max_size} bytes", field)
    return raw


def _as_bytes(data: Any) -> bytes:
    # bytes(n) of an int would quietly sign n zero bytes.
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"data must be bytes, not {type(data).__name__}")
    return bytes(data)


def _check_agent_id(value: Any, field: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_AGENT_ID_LEN:
        raise SealError(f"malformed {field}: must be a string of 1 to {MAX_AGENT_ID_LEN} characters", field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise SealError(f"malformed {field}: must be valid Unicode", field) from None
    return value


def _short(value: Any) -> str:
    """An attacker-chosen value, quoted and cut short, for an error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _payload_json(value: Any) -> bytes:
    """The compact, key-sorted UTF-8 JSON that is encrypted."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode("utf-8")
    except RecursionError:
        raise SealError("malformed payload: nested too deeply", "payload") from None
    except UnicodeEncodeError:
        raise SealError("malformed payload: must be valid Unicode (no lone surrogates)", "payload") from None
    except (TypeError, ValueError) as exc:  # unserializable, mixed key types, NaN, cycles
        raise SealError(f"malformed payload: not JSON ({type(exc).__name__}: {exc})", "payload") from None


def _signed_bytes(sender: str, keys: Mapping[str, str], ciphertext: str) -> bytes:
    """``SIGNING_CONTEXT`` + canonical JSON of every envelope field but ``sig``.

    Fields are validated first (str ids and base64), so this is injective:
    two different envelopes never produce the same bytes.
    """
    unsigned = {"sealed": VERSION, "alg": ALG, "sender": sender, "keys": dict(keys), "ciphertext": ciphertext}
    body = json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return SIGNING_CONTEXT + body.encode("ascii")


def _verify_key(public_key_b64: Any, field: str) -> nacl.signing.VerifyKey:
    raw = _unb64(public_key_b64, field, size=PUBLIC_KEY_BYTES)
    try:
        return nacl.signing.VerifyKey(raw)
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise SealError(f"malformed {field}: not an Ed25519 public key", field) from None


def _box_public_key(public_key_b64: Any, field: str) -> nacl.public.PublicKey:
    try:
        return _verify_key(public_key_b64, field).to_curve25519_public_key()
    except nacl.exceptions.CryptoError:  # a small-order point has no X25519 counterpart
        raise SealError(f"malformed {field}: not a usable Ed25519 public key", field) from None


# -- identities ---------------------------------------------------------------------------------


class AgentKeys:
    """An agent's Ed25519 signing key (and the X25519 key derived from it for sealing).

    Holds private key material: it never appears in ``repr``/``str``, in
    error messages or in logs. Never changes after construction; safe to
    share between threads.
    """

    __slots__ = ("_box_private", "_public_key", "_seed", "_signing_key")

    def __init__(self, seed: bytes) -> None:
        """Prefer ``generate``, ``from_seed`` or ``load``. Raises ``SealError`` unless ``seed`` is 32 bytes."""
        if not isinstance(seed, bytes | bytearray) or len(seed) != SEED_BYTES:
            raise SealError(f"malformed seed: must be {SEED_BYTES} bytes", "seed")
        self._seed = bytes(seed)
        self._signing_key = nacl.signing.SigningKey(self._seed)
        self._box_private = self._signing_key.to_curve25519_private_key()
        self._public_key = _b64(bytes(self._signing_key.verify_key))

    @classmethod
    def generate(cls) -> AgentKeys:
        """A new identity from the OS random source."""
        return cls(nacl.utils.random(SEED_BYTES))

    @classmethod
    def from_seed(cls, seed: bytes) -> AgentKeys:
        """The identity of a 32-byte seed (deterministic: same seed, same keys)."""
        return cls(seed)

    @property
    def public_key(self) -> str:
        """The Ed25519 verify key, standard padded base64: what the agent registers."""
        return self._public_key

    def sign(self, data: bytes) -> str:
        """A detached Ed25519 signature of ``data``, base64. Check it with ``verify``."""
        return _b64(self._signing_key.sign(_as_bytes(data)).signature)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key to ``path`` with mode 0600, replacing any file there.

        Atomic: the file is written next to ``path`` under a temporary name,
        synced and renamed, so a crash leaves the old file or the new one,
        never a torn key and never a moment with looser permissions.
        Blocking; raises ``OSError`` if the directory is not writable.
        """
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        document = {"version": _KEY_FILE_VERSION, "type": _KEY_FILE_TYPE, "seed": _b64(self._seed),
                    "public_key": self._public_key}
        data = (json.dumps(document, indent=1, sort_keys=True) + "\n").encode("ascii")
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".agent-key-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as file:
                os.fchmod(file.fileno(), 0o600)  # mkstemp already does; the contract is explicit
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        # Make the rename itself durable; best effort (not every filesystem allows it).
        with contextlib.suppress(OSError):
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AgentKeys:
        """Read a key written by ``save``.

        Raises ``SealError`` for a file that group or others may access
        (the message says how to fix it), that is not a regular file or
        that is not a key file, and ``OSError`` if it cannot be read. The
        mode is checked on the opened file itself, so a swap between the
        check and the read makes no difference. Blocking.
        """
        path = os.fspath(path)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise SealError(f"{path}: not a regular file", "path")
            mode = stat.S_IMODE(info.st_mode)
            if mode & 0o077:
                raise SealError(
                    f"{path}: key file is accessible by group or others (mode {mode:04o}); "
                    f"fix with: chmod 600 {path}", "path")
            chunks: list[bytes] = []
            size = 0
            while size <= _MAX_KEY_FILE_BYTES:
                chunk = os.read(fd, _MAX_KEY_FILE_BYTES + 1 - size)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        finally:
            os.close(fd)
        if size > _MAX_KEY_FILE_BYTES:
            raise SealError(f"{path}: not an agent key file (too large)", "path")
        return cls._from_document(b"".join(chunks), path)

    @classmethod
    def _from_document(cls, data: bytes, path: str) -> AgentKeys:
        # Errors name the problem, never the content: the content is a private key.
        try:
            document = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise SealError(f"{path}: not an agent key file (not JSON)", "path") from None
        if not isinstance(document, dict) or document.get("type") != _KEY_FILE_TYPE:
            raise SealError(f"{path}: not an agent key file", "path")
        version = document.get("version")
        if type(version) is not int or version != _KEY_FILE_VERSION:
            raise SealError(f"{path}: unsupported version of agent key file", "path")
        try:
            keys = cls(_unb64(document.get("seed"), "seed", size=SEED_BYTES))
        except SealError:
            raise SealError(f"{path}: not an agent key file (bad seed)", "path") from None
        if document.get("public_key") != keys.public_key:
            raise SealError(f"{path}: corrupt agent key file (public key does not match the seed)", "path")
        return keys

    def __repr__(self) -> str:
        return f"AgentKeys(public_key={self._public_key!r})"


def verify(public_key_b64: str, data: bytes, signature_b64: str) -> bool:
    """Whether ``signature_b64`` is ``public_key_b64``'s signature of ``data``.

    False, never an exception, for a malformed key or signature;
    ``TypeError`` only if ``data`` is not bytes.
    """
    try:
        key = _verify_key(public_key_b64, "public_key")
        signature = _unb64(signature_b64, "signature", size=SIGNATURE_BYTES)
        key.verify(_as_bytes(data), signature)
    except (SealError, nacl.exceptions.CryptoError):
        return False
    return True


# -- sealing ------------------------------------------------------------------------------------


def seal(payload: Any, *, sender_id: str, sender: AgentKeys, recipients: Mapping[str, str]) -> dict[str, Any]:
    """Encrypt ``payload`` for ``recipients`` (agent id -> Ed25519 public key,
    base64) and sign the result as ``sender_id``. Returns the envelope, a
    JSON-able dict.

    ``payload`` is any JSON value. It arrives as JSON gives it back: tuples
    as lists, non-string keys as strings. The sender reads its own message
    only if it lists itself as a recipient. Raises ``SealError`` for a
    payload that is not JSON or is over ``MAX_PLAINTEXT_BYTES`` once encoded,
    for more than ``MAX_RECIPIENTS`` or none, and for a malformed id or
    public key (the field is named).
    """
    if not isinstance(sender, AgentKeys):
        raise TypeError("sender must be AgentKeys")
    _check_agent_id(sender_id, "sender_id")
    if not isinstance(recipients, Mapping) or not 1 <= len(recipients) <= MAX_RECIPIENTS:
        raise SealError(f"malformed recipients: must map 1 to {MAX_RECIPIENTS} agent ids to public keys",
                        "recipients")
    boxes = {}
    for recipient_id, public_key in recipients.items():
        _check_agent_id(recipient_id, "recipients")
        boxes[recipient_id] = _box_public_key(public_key, f"recipients[{recipient_id!r}]")
    plaintext = _payload_json({"payload": payload, "sender": sender_id})
    if len(plaintext) > MAX_PLAINTEXT_BYTES:
        raise SealError(f"malformed payload: {len(plaintext)} bytes encoded, over {MAX_PLAINTEXT_BYTES}", "payload")

    key = nacl.utils.random(_SYMMETRIC_KEY_BYTES)
    ciphertext = _b64(bytes(nacl.secret.SecretBox(key).encrypt(plaintext)))
    keys = {rid: _b64(nacl.public.SealedBox(box).encrypt(key)) for rid, box in boxes.items()}
    signature = sender.sign(_signed_bytes(sender_id, keys, ciphertext))
    return {"sealed": VERSION, "alg": ALG, "sender": sender_id, "keys": keys, "ciphertext": ciphertext,
            "sig": signature}


def is_sealed(payload: Any) -> bool:
    """Whether ``payload`` claims to be an envelope: a dict with a ``"sealed"`` key.

    A claim, not a check: hand it to ``open_sealed``, which refuses
    anything malformed. ``open_sealed`` says "not sealed" exactly when
    this is False.
    """
    return isinstance(payload, dict) and "sealed" in payload


def open_sealed(envelope: Any, *, recipient_id: str, recipient: AgentKeys, sender_public_key: str) -> Any:
    """The payload of ``envelope``, opened as ``recipient_id``.

    ``sender_public_key`` is the registered key of the agent named in
    ``envelope["sender"]``. Look it up by that name, and check that the
    bus message's source names the same agent.

    Raises ``SealError``, and nothing else, for any envelope: not sealed,
    unsupported version, a malformed or oversized field, a signature that
    does not verify with ``sender_public_key``, ``recipient_id`` not among
    the recipients, or content that does not open. The signature is
    checked before anything is decrypted.
    """
    if not isinstance(recipient, AgentKeys):
        raise TypeError("recipient must be AgentKeys")
    if not is_sealed(envelope):
        raise SealError("not sealed")
    version = envelope["sealed"]
    if type(version) is not int or version != VERSION:
        raise SealError(f"unsupported version: sealed={_short(version)}, expected {VERSION}", "sealed")
    for name in _FIELDS:
        if name not in envelope:
            raise SealError(f"malformed envelope: missing {name}", name)
    for name in envelope:
        if name not in _FIELDS:
            # An unsigned field could carry anything; refuse rather than ignore.
            raise SealError(f"malformed envelope: unexpected field {_short(name)}", "envelope")
    alg = envelope["alg"]
    if not isinstance(alg, str) or alg != ALG:
        raise SealError(f"unsupported version: alg={_short(alg)}, expected {ALG!r}", "alg")

    sender = _check_agent_id(envelope["sender"], "sender")
    keys = envelope["keys"]
    if not isinstance(keys, dict) or not 1 <= len(keys) <= MAX_RECIPIENTS:
        raise SealError(f"malformed keys: must map 1 to {MAX_RECIPIENTS} agent ids to sealed keys", "keys")
    sealed_keys: dict[str, bytes] = {}
    for rid, value in keys.items():
        _check_agent_id(rid, "keys")
        sealed_keys[rid] = _unb64(value, "keys", size=_SEALED_KEY_BYTES)
    ciphertext_b64 = envelope["ciphertext"]
    ciphertext = _unb64(ciphertext_b64, "ciphertext", min_size=_CIPHERTEXT_OVERHEAD, max_size=MAX_CIPHERTEXT_BYTES)
    signature = _unb64(envelope["sig"], "sig", size=SIGNATURE_BYTES)
    verify_key = _verify_key(sender_public_key, "sender_public_key")

    # The signature first: until it verifies, nothing here came from the sender.
    try:
        verify_key.verify(_signed_bytes(sender, keys, ciphertext_b64), signature)
    except nacl.exceptions.CryptoError:
        raise SealError(f"bad signature by {_short(sender)}", "sig") from None

    if not isinstance(recipient_id, str) or recipient_id not in sealed_keys:
        raise SealError(f"not a recipient: {_short(recipient_id)} is not among the envelope's keys", "keys")
    try:
        key = nacl.public.SealedBox(recipient._box_private).decrypt(sealed_keys[recipient_id])
    except nacl.exceptions.CryptoError:
        raise SealError(f"tampered: the key sealed for {_short(recipient_id)} does not open with this "
                        "recipient's private key (sealed to another public key?)", "keys") from None
    try:
        plaintext = nacl.secret.SecretBox(key).decrypt(ciphertext)
    except nacl.exceptions.CryptoError:
        raise SealError("tampered: the ciphertext does not authenticate", "ciphertext") from None
    try:
        inner = json.loads(plaintext.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise SealError("tampered: the plaintext is not JSON", "ciphertext") from None
    if not isinstance(inner, dict) or inner.keys() != {"payload", "sender"}:
        raise SealError("tampered: the plaintext is not a sealed message", "ciphertext")
    if inner["sender"] != sender:
        raise SealError(f"tampered: written by {_short(inner['sender'])} but signed by {_short(sender)}", "sender")
    return inner["payload"]


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# -- signed requests ----------------------------------------------------------------------------

SCHEME_AGENT = "Coord-Ed25519"
SIGNED_PREFIX = "COORD-ED25519-V1"


def signed_text(method: str, host: str, path_qs: str, ts_ms: int, nonce: str, body: bytes) -> bytes:
    """What an agent signs for one request."""
    digest = hashlib.sha256(body).hexdigest()
    return "\n".join((SIGNED_PREFIX, method.upper(), host, path_qs, str(ts_ms), nonce, digest)).encode()


def authorization_header(agent_id: str, sign: Callable[[bytes], str], method: str, host: str, path_qs: str,
                         body: bytes, ts_ms: int, nonce: str) -> str:
    """The header an agent sends (used by the Python client)."""
    signature = sign(signed_text(method, host, path_qs, ts_ms, nonce, body))
    return f'{SCHEME_AGENT} agent="{agent_id}", ts="{ts_ms}", nonce="{nonce}", sig="{signature}"'


# -- admission proof of work --------------------------------------------------------------------

POW_MAX_DIFFICULTY = 32


def pow_digest(challenge: str, agent_id: str, public_key: str, nonce: str) -> bytes:
    return hashlib.sha256(f"{challenge}:{agent_id}:{public_key}:{nonce}".encode()).digest()


def leading_zero_bits(digest: bytes) -> int:
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def solve_pow(challenge: str, agent_id: str, public_key: str, difficulty: int, max_tries: int = 1 << 34) -> str:
    """A nonce whose digest has ``difficulty`` leading zero bits (hashcash).
    CPU-bound: about 2**difficulty hashes; run it in a thread."""
    for i in range(max_tries):
        nonce = format(i, "x")
        if leading_zero_bits(pow_digest(challenge, agent_id, public_key, nonce)) >= difficulty:
            return nonce
    raise ValueError(f"no proof found in {max_tries} tries")


# -- keys derived from the cluster secret ----------------------------------------------------------

HKDF_HASH_BYTES = 32  # SHA-256
HKDF_LENGTH_MAX = 255 * HKDF_HASH_BYTES
# One ``info`` per use of the cluster secret, so a MAC made for one purpose
# is never valid for another (and none is keyed with the raw secret).
KEY_FORWARDED_PRINCIPAL = b"coordinator/v1/forwarded-principal"
KEY_JOIN_CHALLENGE = b"coordinator/v1/join-challenge"
KEY_RAFT_WIRE = b"coordinator/v1/raft-wire"
KEY_GOSSIP = b"coordinator/v1/gossip"  # heard heartbeats between nodes (services.gossip)
KEY_HEARTBEAT = b"coordinator/v1/heartbeat"  # per-lease keys of heartbeat datagrams (coordinator.datagram)


class FrameBox:
    """Authenticated encryption of frames under one 32-byte key
    (XSalsa20-Poly1305, a random 24-byte nonce in front of each)."""

    OVERHEAD = _CIPHERTEXT_OVERHEAD

    def __init__(self, key: bytes) -> None:
        self._box = nacl.secret.SecretBox(key)

    def seal(self, plaintext: bytes) -> bytes:
        return bytes(self._box.encrypt(plaintext))

    def unseal(self, sealed: bytes) -> bytes | None:
        """What ``seal`` sealed under this key; None when it does not verify."""
        try:
            return bytes(self._box.decrypt(sealed))
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            return None


def hkdf_sha256(secret: bytes, info: bytes, length: int = HKDF_HASH_BYTES, salt: bytes = b"") -> bytes:
    """HKDF with HMAC-SHA-256 (RFC 5869): extract with ``salt`` (empty means
    32 zero bytes, as the RFC says), then expand to ``length`` bytes for
    ``info``. Pure; ``ValueError`` for a length over 255 hashes."""
    if not 0 < length <= HKDF_LENGTH_MAX:
        raise ValueError(f"length: must be between 1 and {HKDF_LENGTH_MAX}")
    prk = hmac.new(salt or bytes(HKDF_HASH_BYTES), secret, hashlib.sha256).digest()
    out, block = b"", b""
    for counter in range(1, -(-length // HKDF_HASH_BYTES) + 1):
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
    return out[:length]


def derived_key(cluster_secret: str, purpose: bytes) -> bytes:
    """The 32-byte key for one ``purpose`` (``KEY_*``) derived from the cluster secret."""
    return hkdf_sha256(cluster_secret.encode("utf-8"), purpose)
