"""The client commands' shared options (flags over COORD_* variables, the
admin token never a flag), their output (-w table|json) and the exit code
of every outcome; no cluster needed (the cluster half is
tests/integration/test_cli_cluster.py)."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest

from coordinator.cli import exits, main
from coordinator.cli.commands import MAX_INPUT_BYTES, read_input
from coordinator.cli.main import _parser, _split_command
from coordinator.cli.output import cell, emit, emit_line, table
from coordinator.cli.settings import DEFAULT_ENDPOINTS, resolve
from coordinator.client import ApiError
from coordinator.crypto import AgentKeys
from coordinator.errors import (
    Compacted,
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    OutcomeUnknown,
    RateLimited,
    TooLarge,
    Unauthenticated,
    Unavailable,
)

TOKEN = "s3cret-admin-token-0123456789"


def _args(*argv: str) -> argparse.Namespace:
    return _parser().parse_args(list(argv))


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "admin.token"
    path.write_text(TOKEN + "\n")
    return path


# -- where each setting comes from -----------------------------------------------------------------

def test_without_flags_or_environment_the_defaults_apply() -> None:
    settings = resolve(_args("kv", "get", "k"), {})
    assert settings.endpoints == (DEFAULT_ENDPOINTS,)
    assert (settings.token, settings.agent_id, settings.keys, settings.tls_ca) == (None, None, None, None)
    assert (settings.timeout_s, settings.write_out) == (10.0, "table")


def test_the_environment_supplies_every_option(token_file: Path) -> None:
    env = {"COORD_ENDPOINTS": "127.0.0.1:1, 127.0.0.1:2,", "COORD_TOKEN_FILE": str(token_file),
           "COORD_TLS_CA": "/ca.pem", "COORD_TIMEOUT": "2.5", "COORD_WRITE_OUT": "json"}
    settings = resolve(_args("kv", "get", "k"), env)
    assert settings.endpoints == ("127.0.0.1:1", "127.0.0.1:2")
    assert settings.token == TOKEN
    assert (settings.tls_ca, settings.timeout_s, settings.write_out) == ("/ca.pem", 2.5, "json")
    assert resolve(_args("status"), {"COORD_TOKEN": TOKEN}).token == TOKEN


def test_flags_win_over_the_environment_before_or_after_the_command(tmp_path: Path, token_file: Path) -> None:
    other = tmp_path / "other.token"
    other.write_text("flag-token\n")
    env = {"COORD_ENDPOINTS": "127.0.0.1:1", "COORD_TOKEN": TOKEN, "COORD_WRITE_OUT": "json", "COORD_TIMEOUT": "9"}
    after = resolve(_args("kv", "get", "k", "--endpoints", "10.0.0.1:7001", "--token-file", str(other), "-w",
                          "table", "--timeout", "1"), env)
    assert (after.endpoints, after.token, after.write_out, after.timeout_s) == (("10.0.0.1:7001",), "flag-token",
                                                                                "table", 1.0)
    before = resolve(_args("--endpoints", "10.0.0.2:7001", "-w", "table", "members", "list"), env)
    assert (before.endpoints, before.write_out, before.token) == (("10.0.0.2:7001",), "table", TOKEN)


def test_the_old_endpoint_flag_and_status_json_still_work() -> None:
    old = resolve(_args("members", "remove", "--endpoint", "127.0.0.1:9", "--id", "n4"), {})
    assert old.endpoints == ("127.0.0.1:9",)
    assert resolve(_args("status", "--endpoint", "127.0.0.1:9", "--json"), {}).write_out == "json"
    assert resolve(_args("status", "--endpoint", "127.0.0.1:9", "--endpoints", "127.0.0.1:8"), {}).endpoints == \
        ("127.0.0.1:8",)


@pytest.mark.parametrize("argv", [["kv", "get", "k", "--token", TOKEN], ["kv", "get", "k", "--tok", TOKEN],
                                  ["--token", TOKEN, "kv", "get", "k"], ["members", "list", "--token=" + TOKEN]])
def test_a_token_is_never_accepted_as_a_flag_value(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == exits.REFUSED
    err = capsys.readouterr().err
    assert "--token-file" in err and TOKEN not in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as refused:
        _parser().parse_args(argv)  # the parser has no such option either
    assert refused.value.code == exits.REFUSED


def test_an_agent_identity_from_flags_beats_a_token_from_the_environment(tmp_path: Path, token_file: Path) -> None:
    key_file = tmp_path / "alice.key"
    keys = AgentKeys.generate()
    keys.save(str(key_file))
    env = {"COORD_TOKEN": TOKEN}
    settings = resolve(_args("kv", "get", "k", "--agent-id", "alice", "--agent-key-file", str(key_file)), env)
    assert (settings.token, settings.agent_id) == (None, "alice")
    assert settings.keys is not None and settings.keys.public_key == keys.public_key
    from_env = resolve(_args("kv", "get", "k"), {"COORD_AGENT_ID": "alice", "COORD_AGENT_KEY_FILE": str(key_file)})
    assert from_env.agent_id == "alice" and from_env.token is None


@pytest.mark.parametrize(("argv", "env", "field"), [
    (["--token-file", "TOKEN_FILE", "--agent-id", "a"], {}, "token-file"),
    ([], {"COORD_TOKEN": TOKEN, "COORD_AGENT_ID": "a"}, "token"),
    (["--agent-id", "a"], {}, "agent-key-file"),
    ([], {"COORD_AGENT_KEY_FILE": "/k"}, "agent-id"),
    (["--timeout", "0"], {}, "timeout"),
    ([], {"COORD_TIMEOUT": "soon"}, "timeout"),
    ([], {"COORD_WRITE_OUT": "yaml"}, "write-out"),
    ([], {"COORD_ENDPOINTS": " , "}, "endpoints"),
])
def test_settings_that_cannot_work_are_refused_naming_the_option(argv: list[str], env: dict[str, str], field: str,
                                                                  token_file: Path) -> None:
    argv = [str(token_file) if a == "TOKEN_FILE" else a for a in argv]
    with pytest.raises(InvalidInput) as refused:
        resolve(_args("kv", "get", "k", *argv), env)
    assert refused.value.field == field


@pytest.mark.parametrize("content", [b"", b"two tokens\n", b"x" * 5000, b"\xff\xfe"])
def test_a_bad_token_file_is_refused_without_showing_it(content: bytes, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "token"
    path.write_bytes(content)
    assert main(["kv", "get", "k", "--token-file", str(path)]) == exits.REFUSED
    err = capsys.readouterr().err
    assert err.startswith("coordinator: token-file: ") and err.count("\n") == 1
    assert (content.decode(errors="replace")[:20] not in err) or not content.strip()
    assert main(["kv", "get", "k", "--token-file", str(tmp_path / "missing")]) == exits.REFUSED
    assert "No such file" in capsys.readouterr().err


def test_the_settings_never_show_the_token(token_file: Path) -> None:
    settings = resolve(_args("kv", "get", "k", "--token-file", str(token_file)), {})
    assert TOKEN not in repr(settings) and TOKEN not in str(settings)


def test_lock_takes_the_command_after_a_double_dash_and_other_commands_keep_theirs() -> None:
    assert _split_command(["lock", "L", "--holder", "h", "--", "sh", "-c", "x --holder"]) == \
        (["lock", "L", "--holder", "h"], ["sh", "-c", "x --holder"])
    assert _split_command(["-w", "json", "--endpoints", "lock", "lock", "L", "--", "true"]) == \
        (["-w", "json", "--endpoints", "lock", "lock", "L"], ["true"])
    assert _split_command(["kv", "put", "--", "-k", "lock"]) == (["kv", "put", "--", "-k", "lock"], [])
    args = _args("lock", "L", "--holder", "h", "--ttl", "3")
    assert (args.name, args.holder, args.ttl) == ("L", "h", 3.0)


def test_standard_input_is_read_up_to_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b'{"a": 1}')))
    assert read_input("-", "value") == '{"a": 1}'
    assert read_input("plain", "value") == "plain"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"x" * (MAX_INPUT_BYTES + 1))))
    with pytest.raises(InvalidInput) as refused:
        read_input("-", "value")
    assert refused.value.field == "value"


def test_a_value_that_is_not_json_is_refused_before_anything_is_sent(capsys: pytest.CaptureFixture[str]) -> None:
    # The endpoint is closed: reaching it would be exit 3, not 2.
    assert main(["kv", "put", "k", "{oops", "--json", "--endpoints", "127.0.0.1:1", "--timeout", "0.2"]) == 2
    assert capsys.readouterr().err.startswith("coordinator: value: not JSON")


# -- output ----------------------------------------------------------------------------------------

def test_a_table_aligns_columns_under_a_header_and_keeps_each_row_on_one_line() -> None:
    rows = [{"key": "a", "value": "x\ny", "revision": 1}, {"key": "long/key", "value": {"n": [1, 2]}},
            {"key": "t", "value": True, "revision": 10}]
    lines = table(rows, ("key", "value", "revision")).splitlines()
    assert lines == ["KEY       VALUE        REVISION",
                     "a         x\\ny         1",
                     'long/key  {"n":[1,2]}  -',
                     "t         true         10"]
    assert cell(None) == "-" and cell("tab\there") == "tab\\there"


def test_json_output_is_one_document_and_streams_are_one_object_per_line() -> None:
    out = io.StringIO()
    emit({"items": [{"key": "a"}]}, "json", [{"key": "a"}], ("key",), out=out)
    assert json.loads(out.getvalue()) == {"items": [{"key": "a"}]}
    out = io.StringIO()
    emit({"key": "a", "revision": 3}, "table", out=out)
    assert out.getvalue().splitlines() == ["KEY  REVISION", "a    3"]
    out = io.StringIO()
    for change in ({"revision": 1, "key": "a", "value": {"v": 1}}, {"revision": 2, "key": "b", "value": None}):
        emit_line(change, "json", ("revision", "key"), out=out)
    assert [json.loads(line)["revision"] for line in out.getvalue().splitlines()] == [1, 2]
    out = io.StringIO()
    emit_line({"revision": 2, "type": "delete", "key": "b", "value": None}, "table",
              ("revision", "type", "key", "value"), out=out)
    assert out.getvalue() == "2  delete  b  -\n"


# -- exit codes --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("error", "code"), [
    (NotFound("no such key"), exits.ABSENT),
    (Conflict("held"), exits.ABSENT),
    (Compacted("gone"), exits.ABSENT),
    (InvalidInput("bad", field="key"), exits.REFUSED),
    (TooLarge("big"), exits.REFUSED),
    (Unauthenticated("who"), exits.REFUSED),
    (Forbidden("no"), exits.REFUSED),
    (ApiError(418, "teapot"), exits.REFUSED),
    (Unavailable("no quorum"), exits.UNAVAILABLE),
    (OutcomeUnknown("timed out"), exits.UNAVAILABLE),
    (RateLimited("slow down"), exits.UNAVAILABLE),
    (ApiError(500, "boom"), exits.UNAVAILABLE),
])
def test_every_error_has_its_exit_code(error: Exception, code: int) -> None:
    assert exits.exit_code(error) == code  # type: ignore[arg-type]


def test_the_line_said_names_the_field_and_what_an_unknown_outcome_means() -> None:
    assert exits.message(InvalidInput("must be host:port", field="raft")) == "raft: must be host:port"
    assert exits.message(InvalidInput("raft: must be host:port", field="raft")) == "raft: must be host:port"
    said = exits.message(OutcomeUnknown("ServerDisconnectedError talking to http://n1", request_id="r-17"))
    assert "outcome unknown" in said and "request id r-17" in said and "\n" not in said
    assert "nothing was applied" in exits.message(Unavailable("no quorum"))


def test_a_cluster_that_cannot_be_reached_is_exit_3_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kv", "get", "k", "--endpoints", "127.0.0.1:1", "--timeout", "0.3"]) == exits.UNAVAILABLE
    err = capsys.readouterr().err
    assert err.startswith("coordinator: ") and err.count("\n") == 1 and "Traceback" not in err


def test_usage_errors_are_exit_2_and_the_help_documents_the_codes(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["kv", "frobnicate"], ["kv", "watch", "--count", "0"], ["subscribe", "t", "--count", "x"],
                 ["kv", "list", "--limit", "-1"], ["lock"]):
        with pytest.raises(SystemExit) as refused:
            main(argv)
        assert refused.value.code == exits.REFUSED, argv
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    for line in ("0    success", "1    absent", "2    usage", "3    the cluster could not answer",
                 "130  interrupted", "COORD_ENDPOINTS", "COORD_TOKEN", "COORD_AGENT_KEY_FILE"):
        assert line in help_text
