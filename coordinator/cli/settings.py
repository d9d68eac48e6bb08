"""The options every client command takes, and where their values come from.

Each option has an environment variable, so a shell that exported them types
no flag twice; a flag wins over its variable. The admin token is never a
flag value (it would show in ``ps``): it comes from ``--token-file``,
``COORD_TOKEN`` or ``COORD_TOKEN_FILE``. A credential given by flag wins
over one from the environment (``--agent-id``/``--agent-key-file`` on the
command line sign as that agent even with ``COORD_TOKEN`` exported); two of
the same standing are refused.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass

from coordinator.cli.output import FORMATS
from coordinator.client import CoordinatorClient
from coordinator.crypto import AgentKeys
from coordinator.errors import InvalidInput

DEFAULT_ENDPOINTS = "127.0.0.1:7001"
DEFAULT_TIMEOUT_S = 10.0
MAX_TIMEOUT_S = 3600.0
MAX_TOKEN_FILE_BYTES = 4096
MAX_ENDPOINTS = 64
MAX_ENDPOINT_LEN = 512

# option dest -> environment variable
ENV = {
    "endpoints": "COORD_ENDPOINTS",
    "token_file": "COORD_TOKEN_FILE",
    "agent_id": "COORD_AGENT_ID",
    "agent_key_file": "COORD_AGENT_KEY_FILE",
    "tls_ca": "COORD_TLS_CA",
    "timeout": "COORD_TIMEOUT",
    "write_out": "COORD_WRITE_OUT",
}
TOKEN_ENV = "COORD_TOKEN"


def global_options() -> argparse.ArgumentParser:
    """The parent parser of every client command (and of the top level, so
    they may come before the command too). Defaults are suppressed: an
    option not given leaves no attribute, and ``resolve`` falls back to the
    environment, then to the default."""
    parent = argparse.ArgumentParser(add_help=False, allow_abbrev=False, argument_default=argparse.SUPPRESS)
    group = parent.add_argument_group("connection (every client command; flags win over the environment)")
    group.add_argument("--endpoints", metavar="HOST:PORT,...",
                       help=f"members to talk to, comma-separated (COORD_ENDPOINTS; default {DEFAULT_ENDPOINTS})")
    group.add_argument("--token-file", metavar="PATH",
                       help="file holding the admin token (COORD_TOKEN_FILE, or the token itself in COORD_TOKEN)")
    group.add_argument("--agent-id", metavar="ID", help="sign requests as this agent (COORD_AGENT_ID) ...")
    group.add_argument("--agent-key-file", metavar="PATH",
                       help="... with its key file from 'coordinator agent-key new' (COORD_AGENT_KEY_FILE)")
    group.add_argument("--tls-ca", metavar="PATH", help="CA certificate (PEM) of an HTTPS cluster (COORD_TLS_CA)")
    group.add_argument("--timeout", metavar="SECONDS", type=float,
                       help=f"give up on the cluster after this long (COORD_TIMEOUT; default {DEFAULT_TIMEOUT_S:g})")
    group.add_argument("-w", "--write-out", choices=FORMATS,
                       help="table (default) or json (COORD_WRITE_OUT)")
    return parent


@dataclass(frozen=True, slots=True)
class Settings:
    endpoints: tuple[str, ...]
    token: str | None
    agent_id: str | None
    keys: AgentKeys | None
    tls_ca: str | None
    timeout_s: float
    write_out: str

    def __repr__(self) -> str:  # never the token
        return (f"Settings(endpoints={self.endpoints!r}, token={'<set>' if self.token else None}, "
                f"agent_id={self.agent_id!r}, tls_ca={self.tls_ca!r}, timeout_s={self.timeout_s}, "
                f"write_out={self.write_out!r})")

    def client(self, endpoints: list[str] | None = None) -> CoordinatorClient:
        """A client with these credentials (to ``endpoints`` instead, if given)."""
        return CoordinatorClient(list(endpoints or self.endpoints), timeout_s=self.timeout_s,
                                 request_timeout_s=min(6.0, self.timeout_s), ca_file=self.tls_ca,
                                 token=self.token, agent_id=self.agent_id if self.keys else None, keys=self.keys)


def _given(args: argparse.Namespace, dest: str) -> str | None:
    value = getattr(args, dest, None)
    return None if value is None else str(value)


def read_token_file(path: str) -> str:
    """The token in ``path`` (surrounding whitespace dropped). Raises
    ``InvalidInput`` naming the option, never showing the file's content."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_TOKEN_FILE_BYTES + 1)
    except OSError as exc:
        raise InvalidInput(f"token-file: cannot read {path}: {exc.strerror}", field="token-file") from None
    if len(raw) > MAX_TOKEN_FILE_BYTES:
        raise InvalidInput(f"token-file: {path} is larger than {MAX_TOKEN_FILE_BYTES} bytes; is it a token?",
                           field="token-file")
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise InvalidInput(f"token-file: {path} does not hold an ASCII token", field="token-file") from None
    if not token or any(c.isspace() or not c.isprintable() for c in token):
        raise InvalidInput(f"token-file: {path} must hold one token on one line", field="token-file")
    return token


def _endpoints(raw: str) -> tuple[str, ...]:
    endpoints = tuple(e.strip() for e in raw.split(",") if e.strip())
    if not endpoints:
        raise InvalidInput("endpoints: give at least one HOST:PORT", field="endpoints")
    if len(endpoints) > MAX_ENDPOINTS or any(len(e) > MAX_ENDPOINT_LEN for e in endpoints):
        raise InvalidInput(f"endpoints: at most {MAX_ENDPOINTS} of at most {MAX_ENDPOINT_LEN} characters",
                           field="endpoints")
    return endpoints


def resolve(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """The settings of one client command: flags, else the environment
    (``environ``, default ``os.environ``), else defaults. Reads the token
    file and the agent's key file (before any event loop runs); raises
    ``InvalidInput`` naming the option for a bad value, ``OSError`` for a key
    file that cannot be read."""
    env = os.environ if environ is None else environ

    def pick(dest: str) -> str | None:
        flag = _given(args, dest)
        return flag if flag is not None else (env.get(ENV[dest]) or None)

    endpoints_raw = _given(args, "endpoints") or _given(args, "endpoint") or env.get(ENV["endpoints"]) \
        or DEFAULT_ENDPOINTS
    write_out = pick("write_out") or ("json" if getattr(args, "json", False) else "table")
    if write_out not in FORMATS:
        raise InvalidInput(f"write-out: must be one of {', '.join(FORMATS)} (from {ENV['write_out']})",
                           field="write-out")
    timeout_raw = pick("timeout")
    try:
        timeout_s = float(timeout_raw) if timeout_raw is not None else DEFAULT_TIMEOUT_S
    except ValueError:
        raise InvalidInput(f"timeout: must be a number of seconds (from {ENV['timeout']})", field="timeout") from None
    if not 0 < timeout_s <= MAX_TIMEOUT_S:
        raise InvalidInput(f"timeout: must be above 0 and at most {MAX_TIMEOUT_S:g} seconds", field="timeout")

    # Credentials: a flag's beat the environment's; two at one level are refused.
    flag_token_file = _given(args, "token_file")
    flag_agent = _given(args, "agent_id") is not None or _given(args, "agent_key_file") is not None
    if flag_token_file is not None and flag_agent:
        raise InvalidInput("token-file: give the admin token or an agent identity, not both", field="token-file")
    token: str | None = None
    agent_id = agent_key_file = None
    if flag_token_file is not None:
        token = read_token_file(flag_token_file)
    elif flag_agent:
        agent_id, agent_key_file = pick("agent_id"), pick("agent_key_file")
    else:
        env_token, env_token_file = env.get(TOKEN_ENV) or None, env.get(ENV["token_file"]) or None
        agent_id, agent_key_file = env.get(ENV["agent_id"]) or None, env.get(ENV["agent_key_file"]) or None
        if (env_token or env_token_file) and (agent_id or agent_key_file):
            raise InvalidInput(f"token: the environment holds an admin token ({TOKEN_ENV} or {ENV['token_file']}) "
                               f"and an agent identity ({ENV['agent_id']}); unset one or pass a flag",
                               field="token")
        if env_token:
            token = env_token.strip()
            if any(c.isspace() or not c.isprintable() for c in token):
                raise InvalidInput(f"token: {TOKEN_ENV} must hold one token", field="token")
        elif env_token_file:
            token = read_token_file(env_token_file)
    if (agent_id is None) != (agent_key_file is None):
        missing = "agent-key-file" if agent_key_file is None else "agent-id"
        raise InvalidInput(f"{missing}: an agent signs with --agent-id and --agent-key-file together "
                           f"({ENV['agent_id']}, {ENV['agent_key_file']})", field=missing)
    endpoints = _endpoints(endpoints_raw)
    keys = AgentKeys.load(agent_key_file) if agent_key_file else None
    return Settings(endpoints=endpoints, token=token, agent_id=agent_id, keys=keys, tls_ca=pick("tls_ca"),
                    timeout_s=timeout_s, write_out=write_out)
