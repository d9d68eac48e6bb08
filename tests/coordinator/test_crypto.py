"""End-to-end sealing: round trips, tampering, signature-before-decryption,
key files, and fuzzing that ``open_sealed`` raises nothing but ``SealError``.

An agent that receives a sealed message only survives ``SealError``; anything
else out of ``open_sealed`` on a hostile envelope would crash its handler.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from typing import Any

import nacl.public
import nacl.secret
import nacl.signing
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from coordinator.crypto import (
    ALG,
    MAX_CIPHERTEXT_BYTES,
    MAX_PLAINTEXT_BYTES,
    MAX_RECIPIENTS,
    SIGNING_CONTEXT,
    AgentKeys,
    SealError,
    is_sealed,
    open_sealed,
    seal,
    verify,
)
from coordinator.errors import CoordinatorError

FAST = settings(max_examples=100, deadline=None)
FUZZ = settings(max_examples=300, deadline=None)

ALICE = AgentKeys.from_seed(b"A" * 32)
BOB = AgentKeys.from_seed(b"B" * 32)
CAROL = AgentKeys.from_seed(b"C" * 32)
DAVE = AgentKeys.from_seed(b"D" * 32)  # never a recipient
MALLORY = AgentKeys.from_seed(b"M" * 32)  # sees envelopes, holds her own registered identity
AGENTS = {"alice": ALICE, "bob": BOB, "carol": CAROL, "dave": DAVE, "mallory": MALLORY}


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


SECRET = {"task": "t-1", "secret": "launch codes"}


def _seal(payload: Any = SECRET, to: tuple[str, ...] = ("bob", "carol"), sender_id: str = "alice") -> dict[str, Any]:
    return seal(payload, sender_id=sender_id, sender=AGENTS[sender_id],
                recipients={name: AGENTS[name].public_key for name in to})


def _open(envelope: Any, as_: str = "bob", sender_public_key: str | None = None) -> Any:
    return open_sealed(envelope, recipient_id=as_, recipient=AGENTS[as_],
                       sender_public_key=ALICE.public_key if sender_public_key is None else sender_public_key)


def _resign(envelope: dict[str, Any], signer: AgentKeys) -> dict[str, Any]:
    """Sign ``envelope`` as the module docstring specifies, reimplemented here so
    the wire format is pinned by a second implementation."""
    unsigned = {k: v for k, v in envelope.items() if k != "sig"}
    body = json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    return {**envelope, "sig": signer.sign(SIGNING_CONTEXT + body)}


def _flip_bit(text: str, bit: int) -> str:
    raw = bytearray(base64.b64decode(text))
    raw[(bit // 8) % len(raw)] ^= 1 << (bit % 8)
    return _b64(bytes(raw))


# -- round trips ------------------------------------------------------------------------------------


def test_one_recipient_opens_it() -> None:
    envelope = _seal(to=("bob",))
    assert _open(envelope) == SECRET


def test_three_recipients_each_open_it_and_nobody_else() -> None:
    payload = {"n": 1, "items": [1, 2.5, None, True, "é"]}
    envelope = _seal(payload, to=("bob", "carol", "alice"))
    for name in ("bob", "carol", "alice"):
        assert _open(envelope, as_=name) == payload
    with pytest.raises(SealError, match=r"^not a recipient"):
        _open(envelope, as_="dave")


def test_a_non_recipient_with_a_recipients_id_cannot_open_it() -> None:
    """Dave claims to be bob: the signature holds, but bob's key does not open with dave's private key."""
    envelope = _seal(to=("bob",))
    with pytest.raises(SealError, match=r"^tampered"):
        open_sealed(envelope, recipient_id="bob", recipient=DAVE, sender_public_key=ALICE.public_key)


def test_envelope_is_plain_json_and_hides_the_payload() -> None:
    envelope = _seal(to=("bob", "carol"))
    assert set(envelope) == {"sealed", "alg", "sender", "keys", "ciphertext", "sig"}
    assert envelope["sealed"] == 1
    assert envelope["alg"] == ALG == "x25519-xsalsa20poly1305+ed25519"
    assert envelope["sender"] == "alice"
    assert set(envelope["keys"]) == {"bob", "carol"}
    wire = json.dumps(envelope)
    assert "launch codes" not in wire and "t-1" not in wire
    assert _open(json.loads(wire)) == SECRET
    assert is_sealed(envelope)


def test_every_message_has_a_fresh_key() -> None:
    first, second = _seal(to=("bob",)), _seal(to=("bob",))
    assert first["ciphertext"] != second["ciphertext"]
    assert first["keys"]["bob"] != second["keys"]["bob"]


def test_an_independent_implementation_of_the_documented_format_opens_it() -> None:
    """Pins the wire format: signature over context + canonical JSON, the key in a
    SealedBox to the X25519 key derived from the Ed25519 key, a SecretBox, and the
    plaintext ``{"payload": ..., "sender": ...}``."""
    envelope = _seal({"b": 1, "a": [2]}, to=("bob",))
    assert _resign(envelope, ALICE)["sig"] == envelope["sig"]  # Ed25519 is deterministic
    bob_x25519 = nacl.signing.SigningKey(b"B" * 32).to_curve25519_private_key()
    key = nacl.public.SealedBox(bob_x25519).decrypt(base64.b64decode(envelope["keys"]["bob"]))
    plaintext = nacl.secret.SecretBox(key).decrypt(base64.b64decode(envelope["ciphertext"]))
    assert plaintext == b'{"payload":{"a":[2],"b":1},"sender":"alice"}'


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)


def _strict(value: Any) -> str:
    # == alone would take True for 1 and 1.0 for 1.
    return json.dumps(value, sort_keys=True)


@FAST
@given(payload=json_values)
def test_any_json_payload_round_trips_exactly(payload: Any) -> None:
    opened = _open(_seal(payload, to=("bob",)))
    assert opened == payload
    assert _strict(opened) == _strict(payload)


# -- what seal refuses ----------------------------------------------------------------------------


@pytest.mark.parametrize(("payload", "needle"), [
    ({1, 2}, "payload"),
    (float("nan"), "payload"),
    ("\ud800", "payload"),
    ("x" * MAX_PLAINTEXT_BYTES, "payload"),
])
def test_seal_refuses_what_is_not_json_or_too_large(payload: Any, needle: str) -> None:
    with pytest.raises(SealError, match=rf"^malformed {needle}"):
        seal(payload, sender_id="alice", sender=ALICE, recipients={"bob": BOB.public_key})


def test_seal_refuses_bad_recipients() -> None:
    with pytest.raises(SealError, match=r"^malformed recipients"):
        seal(1, sender_id="alice", sender=ALICE, recipients={})
    too_many = {f"agent-{i}": BOB.public_key for i in range(MAX_RECIPIENTS + 1)}
    with pytest.raises(SealError, match=r"^malformed recipients"):
        seal(1, sender_id="alice", sender=ALICE, recipients=too_many)
    with pytest.raises(SealError, match=r"^malformed recipients\['bob'\]"):
        seal(1, sender_id="alice", sender=ALICE, recipients={"bob": "not a key"})
    small_order = _b64(bytes(32))  # no X25519 counterpart
    with pytest.raises(SealError, match=r"^malformed recipients\['bob'\]"):
        seal(1, sender_id="alice", sender=ALICE, recipients={"bob": small_order})
    with pytest.raises(SealError, match=r"^malformed sender_id"):
        seal(1, sender_id="", sender=ALICE, recipients={"bob": BOB.public_key})


# -- tampering ------------------------------------------------------------------------------------


def _swap_keys(envelope: dict[str, Any]) -> dict[str, Any]:
    keys = dict(envelope["keys"])
    keys["bob"], keys["carol"] = keys["carol"], keys["bob"]
    return {**envelope, "keys": keys}


def _add_recipient(envelope: dict[str, Any]) -> dict[str, Any]:
    mallory_box = nacl.public.SealedBox(nacl.signing.VerifyKey(base64.b64decode(MALLORY.public_key))
                                        .to_curve25519_public_key())
    return {**envelope, "keys": {**envelope["keys"], "mallory": _b64(mallory_box.encrypt(bytes(32)))}}


def _remove_recipient(envelope: dict[str, Any]) -> dict[str, Any]:
    return {**envelope, "keys": {"bob": envelope["keys"]["bob"]}}


def _other_message_sig(envelope: dict[str, Any]) -> dict[str, Any]:
    return {**envelope, "sig": _seal({"other": True})["sig"]}


TAMPERINGS = {
    "ciphertext bit flipped": lambda e: {**e, "ciphertext": _flip_bit(e["ciphertext"], 200)},
    "keys swapped between recipients": _swap_keys,
    "sender changed": lambda e: {**e, "sender": "carol"},
    "recipient added": _add_recipient,
    "recipient removed": _remove_recipient,
    "signature of another message": _other_message_sig,
    "signature bit flipped": lambda e: {**e, "sig": _flip_bit(e["sig"], 3)},
    "sealed key bit flipped": lambda e: {**e, "keys": {**e["keys"], "bob": _flip_bit(e["keys"]["bob"], 40)}},
}


@pytest.mark.parametrize("tamper", TAMPERINGS.values(), ids=TAMPERINGS.keys())
def test_any_tampering_breaks_the_signature(tamper: Any) -> None:
    envelope = tamper(_seal(to=("bob", "carol")))
    with pytest.raises(SealError, match=r"^bad signature by") as caught:
        _open(envelope)
    assert "launch codes" not in str(caught.value)


@pytest.mark.parametrize(("field", "value"), [("sealed", 2), ("sealed", 0), ("sealed", True), ("sealed", 1.0),
                                              ("sealed", "1"), ("alg", "x25519-aes"), ("alg", None)])
def test_another_version_or_algorithm_is_refused(field: str, value: Any) -> None:
    envelope = {**_seal(), field: value}
    with pytest.raises(SealError, match=r"^unsupported version") as caught:
        _open(envelope)
    assert caught.value.field == field


@FAST
@given(bit=st.integers(min_value=0, max_value=10_000), field=st.sampled_from(["ciphertext", "sig", "bob", "carol"]))
def test_any_single_bit_flip_is_refused(bit: int, field: str) -> None:
    envelope = _seal(to=("bob", "carol"))
    if field in ("bob", "carol"):
        envelope["keys"][field] = _flip_bit(envelope["keys"][field], bit)
    else:
        envelope[field] = _flip_bit(envelope[field], bit)
    with pytest.raises(SealError, match=r"^bad signature by 'alice'"):
        _open(envelope)


def test_the_wrong_sender_key_is_a_bad_signature() -> None:
    with pytest.raises(SealError, match=r"^bad signature by 'alice'") as caught:
        _open(_seal(), sender_public_key=MALLORY.public_key)
    assert caught.value.field == "sig"


def test_a_resigned_envelope_cannot_claim_someone_elses_content() -> None:
    """Mallory, who cannot read alice's message to bob, re-signs it as her own:
    the signature is valid for mallory, but the sealed content names alice."""
    stolen = _resign({**_seal(to=("bob",)), "sender": "mallory"}, MALLORY)
    with pytest.raises(SealError, match=r"^tampered: written by 'alice' but signed by 'mallory'"):
        _open(stolen, sender_public_key=MALLORY.public_key)


def test_a_sender_that_signs_garbage_is_tampered_not_trusted() -> None:
    """The signature holds (the sender made it), but the content does not open."""
    swapped = _resign(_swap_keys(_seal(to=("bob", "carol"))), ALICE)
    with pytest.raises(SealError, match=r"^tampered: the key sealed for 'bob'"):
        _open(swapped)
    flipped = _seal(to=("bob",))
    flipped = _resign({**flipped, "ciphertext": _flip_bit(flipped["ciphertext"], 300)}, ALICE)
    with pytest.raises(SealError, match=r"^tampered: the ciphertext"):
        _open(flipped)


def test_not_sealed() -> None:
    for value in (None, "hello", [1], {"task": 1}, {"Sealed": 1}):
        assert not is_sealed(value)
        with pytest.raises(SealError, match=r"^not sealed"):
            _open(value)
    assert is_sealed({"sealed": "anything"})


# -- the signature is checked before anything is decrypted -----------------------------------------


@pytest.fixture
def decryptions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    for cls in (nacl.public.SealedBox, nacl.secret.SecretBox):
        original = cls.decrypt

        def counting(self: Any, *args: Any, _original: Any = original, _name: str = cls.__name__, **kw: Any) -> Any:
            calls.append(_name)
            return _original(self, *args, **kw)

        monkeypatch.setattr(cls, "decrypt", counting)
    return calls


def test_a_valid_envelope_decrypts_once_each(decryptions: list[str]) -> None:
    _open(_seal(to=("bob",)))
    assert decryptions == ["SealedBox", "SecretBox"]


@pytest.mark.parametrize("forge", [
    lambda e: _resign(e, MALLORY),  # valid ciphertext and keys, signed by the wrong agent
    lambda e: {**e, "sig": _flip_bit(e["sig"], 0)},
    _other_message_sig,
], ids=["signed by another key", "signature flipped", "signature of another message"])
def test_a_bad_signature_stops_before_any_decryption(decryptions: list[str], forge: Any) -> None:
    with pytest.raises(SealError, match=r"^bad signature"):
        _open(forge(_seal(to=("bob",))))
    assert decryptions == []


def test_a_non_recipient_decrypts_nothing(decryptions: list[str]) -> None:
    with pytest.raises(SealError, match=r"^not a recipient"):
        _open(_seal(to=("bob",)), as_="dave")
    assert decryptions == []


# -- malformed fields and bounds ---------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("sender", ""),
    ("sender", 7),
    ("sender", "x" * 257),
    ("keys", {}),
    ("keys", []),
    ("keys", {"bob": "short"}),
    ("keys", {"bob": 5}),
    ("ciphertext", 123),
    ("ciphertext", "!!!!"),
    ("ciphertext", "AB=="),  # not canonical: the padding bits are set
    ("ciphertext", _b64(b"too short")),
    ("sig", _b64(bytes(63))),
    ("sig", "é"),
])
def test_malformed_fields_are_named(field: str, value: Any) -> None:
    with pytest.raises(SealError, match=rf"^malformed {field}") as caught:
        _open({**_seal(), field: value})
    assert caught.value.field == field


def test_missing_and_unexpected_fields_are_named() -> None:
    for field in ("alg", "sender", "keys", "ciphertext", "sig"):
        envelope = _seal()
        del envelope[field]
        with pytest.raises(SealError, match=rf"^malformed envelope: missing {field}"):
            _open(envelope)
    with pytest.raises(SealError, match=r"^malformed envelope: unexpected field 'note'"):
        _open({**_seal(), "note": "unsigned"})


def test_a_malformed_sender_public_key_is_named() -> None:
    with pytest.raises(SealError, match=r"^malformed sender_public_key"):
        _open(_seal(), sender_public_key="nope")


def test_oversized_envelopes_are_refused() -> None:
    envelope = _seal(to=("bob",))
    too_many = {f"agent-{i}": envelope["keys"]["bob"] for i in range(MAX_RECIPIENTS + 1)}
    with pytest.raises(SealError, match=r"^malformed keys"):
        _open({**envelope, "keys": too_many})
    for size in (MAX_CIPHERTEXT_BYTES + 1, 4 * MAX_CIPHERTEXT_BYTES):
        huge = _b64(bytes(size))
        with pytest.raises(SealError, match=r"^malformed ciphertext: longer than"):
            _open({**envelope, "ciphertext": huge})


# -- fuzz: only SealError, never the plaintext --------------------------------------------------------


b64_blobs = st.binary(max_size=120).map(_b64)
junk = json_values | b64_blobs | st.text(max_size=40)
envelope_like = st.fixed_dictionaries(
    {
        "sealed": st.sampled_from([1, 1, 1, 0, 2, True, 1.0, "1", None]) | json_values,
        "alg": st.just(ALG) | junk,
        "sender": st.sampled_from(["alice", "bob", ""]) | junk,
        "keys": st.dictionaries(st.sampled_from(["bob", "carol"]) | st.text(max_size=10),
                                st.binary(min_size=80, max_size=80).map(_b64) | junk, max_size=4) | junk,
        "ciphertext": st.binary(min_size=40, max_size=200).map(_b64) | junk,
        "sig": st.binary(min_size=64, max_size=64).map(_b64) | junk,
    },
    optional={"extra": junk},
)


def _only_seal_error(envelope: Any, sender_public_key: str | None = None) -> None:
    try:
        opened = _open(envelope, sender_public_key=sender_public_key)
    except SealError:
        return
    pytest.fail(f"opened junk: {opened!r}")


@FUZZ
@given(envelope=json_values)
def test_arbitrary_json_raises_only_seal_error(envelope: Any) -> None:
    _only_seal_error(envelope)


@FUZZ
@given(envelope=envelope_like, sender_public_key=st.sampled_from([ALICE.public_key]) | st.text(max_size=50))
def test_envelope_shaped_junk_raises_only_seal_error(envelope: dict[str, Any], sender_public_key: str) -> None:
    _only_seal_error(envelope, sender_public_key)


REAL = _seal(to=("bob", "carol"))


@FUZZ
@given(field=st.sampled_from(["sealed", "alg", "sender", "keys", "ciphertext", "sig", "keys.bob"]),
       value=junk, delete=st.booleans())
def test_any_mutation_of_a_real_envelope_raises_only_seal_error(field: str, value: Any, delete: bool) -> None:
    envelope = json.loads(json.dumps(REAL))
    target, name = (envelope["keys"], "bob") if field == "keys.bob" else (envelope, field)
    if delete:
        del target[name]
    else:
        assume(_strict(value) != _strict(target[name]))
        target[name] = value
    _only_seal_error(envelope)


def test_seal_error_is_a_coordinator_error() -> None:
    assert issubclass(SealError, CoordinatorError)
    assert SealError("tampered").code == "seal"


# -- identities ---------------------------------------------------------------------------------------


def test_from_seed_is_deterministic_and_matches_nacl() -> None:
    assert AgentKeys.from_seed(b"A" * 32).public_key == ALICE.public_key
    expected = _b64(bytes(nacl.signing.SigningKey(b"A" * 32).verify_key))
    assert ALICE.public_key == expected
    assert len(ALICE.public_key) == 44 and ALICE.public_key.endswith("=")
    assert AgentKeys.generate().public_key != AgentKeys.generate().public_key


@pytest.mark.parametrize("seed", [b"", b"x" * 31, b"x" * 33, "x" * 32])
def test_from_seed_refuses_a_bad_seed(seed: Any) -> None:
    with pytest.raises(SealError, match=r"^malformed seed"):
        AgentKeys.from_seed(seed)


def test_sign_and_verify() -> None:
    signature = ALICE.sign(b"hello")
    assert verify(ALICE.public_key, b"hello", signature)
    assert not verify(ALICE.public_key, b"hellp", signature)
    assert not verify(BOB.public_key, b"hello", signature)
    assert not verify("junk", b"hello", signature)
    assert not verify(ALICE.public_key, b"hello", "junk")
    assert not verify(ALICE.public_key, b"hello", None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ALICE.sign(5)  # type: ignore[arg-type]


def test_repr_hides_the_private_key() -> None:
    seed = b"S" * 32
    keys = AgentKeys.from_seed(seed)
    shown = repr(keys) + str(keys) + f"{keys}"
    assert keys.public_key in shown
    for secret in (seed, bytes(nacl.signing.SigningKey(seed)), bytes(keys._box_private)):
        for form in (_b64(secret), secret.hex(), repr(secret)):
            assert form not in shown


def _mode(path: Any) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_save_load_round_trip_with_mode_0600(tmp_path: Any, capsys: pytest.CaptureFixture[str],
                                             caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "alice.key"
    ALICE.save(path)
    assert _mode(path) == 0o600
    loaded = AgentKeys.load(path)
    assert loaded.public_key == ALICE.public_key
    assert loaded.sign(b"x") == ALICE.sign(b"x")
    assert _open(_seal(to=("bob",)), as_="bob") and open_sealed(
        _seal(to=("alice",), sender_id="bob"), recipient_id="alice", recipient=loaded,
        sender_public_key=BOB.public_key)
    assert capsys.readouterr() == ("", "")
    assert caplog.records == []
    assert [p.name for p in tmp_path.iterdir()] == ["alice.key"]  # no temporary file left behind


def test_save_replaces_a_loose_file_with_a_0600_one(tmp_path: Any) -> None:
    path = tmp_path / "agent.key"
    path.write_text("old")
    path.chmod(0o644)
    BOB.save(str(path))
    assert _mode(path) == 0o600
    assert AgentKeys.load(str(path)).public_key == BOB.public_key


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_load_refuses_a_file_others_can_read(tmp_path: Any, mode: int) -> None:
    path = tmp_path / "alice.key"
    ALICE.save(path)
    path.chmod(mode)
    with pytest.raises(SealError, match=rf"accessible by group or others \(mode {mode:04o}\); fix with: chmod 600"):
        AgentKeys.load(path)


@pytest.mark.parametrize("content", [
    b"",
    b"not json",
    b"[]",
    b'{"type": "ed25519-seed", "version": 2, "seed": "", "public_key": ""}',
    b'{"type": "ed25519-seed", "version": 1, "seed": "AAAA", "public_key": ""}',
    b"x" * 5000,
])
def test_load_refuses_what_is_not_a_key_file(tmp_path: Any, content: bytes) -> None:
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(SealError, match=r"bad\.key: ") as caught:
        AgentKeys.load(path)
    assert "AAAA" not in str(caught.value)


def test_load_refuses_a_public_key_that_does_not_match_the_seed(tmp_path: Any) -> None:
    path = tmp_path / "alice.key"
    ALICE.save(path)
    document = json.loads(path.read_text())
    document["public_key"] = BOB.public_key
    path.write_text(json.dumps(document))
    with pytest.raises(SealError, match=r"public key does not match the seed") as caught:
        AgentKeys.load(path)
    assert document["seed"] not in str(caught.value)


def test_load_refuses_a_directory(tmp_path: Any) -> None:
    with pytest.raises(SealError, match=r"not a regular file"):
        AgentKeys.load(tmp_path)


# -- HKDF (RFC 5869) ---------------------------------------------------------------------------------

def test_hkdf_sha256_matches_the_rfc_5869_vectors() -> None:
    from coordinator.crypto import hkdf_sha256
    ikm = bytes.fromhex("0b" * 22)
    # test case 1
    okm = hkdf_sha256(ikm, bytes.fromhex("f0f1f2f3f4f5f6f7f8f9"), 42, bytes.fromhex("000102030405060708090a0b0c"))
    assert okm.hex() == ("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
                         "34007208d5b887185865")
    # test case 2: long inputs, 82 bytes out (three blocks)
    okm = hkdf_sha256(bytes(range(0x00, 0x50)), bytes(range(0xb0, 0x100)), 82, bytes(range(0x60, 0xb0)))
    assert okm.hex() == ("b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c"
                         "59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71"
                         "cc30c58179ec3e87c14c01d5c1f3434f1d87")
    # test case 3: no salt, no info
    assert hkdf_sha256(ikm, b"", 42).hex() == ("8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d"
                                               "9d201395faa4b61a96c8")
    with pytest.raises(ValueError):
        hkdf_sha256(ikm, b"", 255 * 32 + 1)


def test_each_use_of_the_cluster_secret_gets_its_own_key() -> None:
    import hashlib
    import hmac

    from coordinator.crypto import KEY_FORWARDED_PRINCIPAL, KEY_JOIN_CHALLENGE, derived_key
    secret = "Zq3v-8kLm_W2xRt9bNc4YhPe7uJd0sAf"
    keys = {derived_key(secret, KEY_FORWARDED_PRINCIPAL), derived_key(secret, KEY_JOIN_CHALLENGE), secret.encode()}
    assert len(keys) == 3 and all(len(k) == 32 for k in keys - {secret.encode()})
    assert derived_key(secret, KEY_JOIN_CHALLENGE) != hmac.new(secret.encode(), b"", hashlib.sha256).digest()
