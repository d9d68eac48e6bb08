"""Broker URLs fit to show: in health details, listings, errors and logs.
Standard library only, so the API and every transport plugin can import it
(the transports may import the core's modules but not its API, services or
state; see the import contracts in setup.cfg).

``redact_url`` keeps what tells a reader which broker is meant (scheme, host,
port, path, a user name next to a password, the names of query options) and
drops what could let someone in: passwords, a user part without a password
(``nats://TOKEN@host``, or ``https://KEY:@host``: a token, for all it can
tell), every query value and the fragment. A user name next to a password
stays, as Go's ``url.URL.Redacted`` keeps it: it names the account, and
broker errors are about it. It fails closed: a URL it cannot take apart without doubt (one
that ``urllib`` refuses, or with an ``@`` outside the authority, where a
password holding ``/``, ``?`` or ``#`` ends up) is shown as
``scheme://<redacted>``, or ``<redacted>`` when it has no scheme either.

``scrub`` cleans a foreign text (a client library's error message) of a URL's
secrets, whichever way the library spelt them.
"""

from __future__ import annotations

import re
from urllib.parse import SplitResult, unquote, urlsplit

HIDDEN = "***"
REDACTED = "<redacted>"
_SCHEME = re.compile(r"\s*([A-Za-z][A-Za-z0-9+.\-]*)://")
_QUERY_KEY = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
# A query option whose value ``scrub`` hides wherever it appears, however short.
_SECRET_KEY = re.compile(r"pass|pwd|secret|token|auth|key|sig|cred|jwt|seed|session", re.IGNORECASE)
# Shorter values of other options (a timeout of 30, a db of 0) are hidden in
# URLs but not hunted in texts, where they would eat every "30" and "0".
_SECRET_MIN = 6
# The user-info of any URL written in a foreign text: from "//" to an "@"
# with no "/", "," or white space between.
_USERINFO_IN_TEXT = re.compile(r"(?<=//)[^/@,\s]*@")


def redact_url(url: str) -> str:
    """``url`` with its secrets replaced by ``***`` (see the module's doc).

    A list of servers separated by commas (``nats://a:1,nats://b:2``, as NATS
    takes them) is redacted server by server. Never raises."""
    servers = _servers(url)
    if servers is not None:
        return ",".join(_redact_one(server) for server in servers)
    return _redact_one(url)


def url_secrets(url: str) -> list[str]:
    """Every spelling (as written and percent-decoded) of what ``redact_url``
    hides of ``url``'s user-info and query values, longest first: the strings a
    foreign text must not repeat. For a URL that cannot be taken apart, the
    user-info as a parser that stops at the first ``/`` would see it, and as
    one that reads to the last ``@`` would. Never raises."""
    found: set[str] = set()
    for server in _servers(url) or [url]:
        found.update(_secrets_of_one(server))
    spellings = found | {unquote(secret) for secret in found}
    return sorted((s for s in spellings if s), key=len, reverse=True)


def scrub(text: str, url: str) -> str:
    """``text`` (a client library's error message, say) with ``url`` shown
    redacted, every spelling of its secrets replaced by ``***``, and the
    user-info of any other URL in it hidden. Never raises."""
    text = text.replace(url, redact_url(url))
    for secret in url_secrets(url):
        text = text.replace(secret, HIDDEN)
    return _USERINFO_IN_TEXT.sub(_hide_userinfo, text)


def _hide_userinfo(match: re.Match[str]) -> str:
    userinfo = match.group()
    return userinfo if userinfo.endswith(f"{HIDDEN}@") else f"{HIDDEN}@"


def _servers(url: str) -> list[str] | None:
    """The servers of a comma-separated list, when every piece is a URL with
    a scheme and none but the last has a query or fragment; None when ``url``
    is one URL (a comma may sit in a password or a query value)."""
    head, comma, _ = url.rpartition(",")
    if not comma or "?" in head or "#" in head:
        return None
    pieces = [piece.strip() for piece in url.split(",")]
    return pieces if all(_SCHEME.match(piece) for piece in pieces) else None


def _split(url: str) -> SplitResult | None:
    """``url`` taken apart, or None when that could be taken two ways or not at all."""
    match = _SCHEME.match(url)
    if match is None:
        return None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not one
    except ValueError:
        return None
    if parts.scheme != match.group(1).lower():
        return None  # white space urllib does not strip before the scheme
    if "@" in parts.path or "@" in parts.query or "@" in parts.fragment:
        return None  # a password holding "/", "?" or "#" spills out of the authority
    return parts


def _redact_one(url: str) -> str:
    parts = _split(url)
    if parts is None:
        match = _SCHEME.match(url)
        return f"{match.group(1).lower()}://{REDACTED}" if match else REDACTED
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if at:
        user, _, password = userinfo.partition(":")
        netloc = f"{user}:{HIDDEN}@{hostport}" if password else f"{HIDDEN}@{hostport}"
    else:
        netloc = hostport
    shown = f"{parts.scheme}://{netloc}{parts.path}"
    if parts.query:
        shown += "?" + "&".join(_redact_option(option) for option in parts.query.split("&") if option)
    if parts.fragment:
        shown += "#" + HIDDEN
    return shown


def _redact_option(option: str) -> str:
    key, eq, _ = option.partition("=")
    return f"{key}={HIDDEN}" if eq and _QUERY_KEY.fullmatch(key) else HIDDEN


def _secrets_of_one(url: str) -> set[str]:
    found: set[str] = set()
    parts = _split(url)
    if parts is not None:
        userinfo, at, _ = parts.netloc.rpartition("@")
        if at:
            user, _, password = userinfo.partition(":")
            secret = password or user
            found.add(secret)
            found.update(secret.split("@"))  # as a library that stops at the first "@" would see it
        for option in parts.query.split("&"):
            key, eq, value = option.partition("=")
            value = value if eq and _QUERY_KEY.fullmatch(key) else option
            if _SECRET_KEY.search(key) or len(value) >= _SECRET_MIN:
                found.add(value)
        if len(parts.fragment) >= _SECRET_MIN:
            found.add(parts.fragment)
        return found
    # Cannot be taken apart: guard what either reading of it would call the user-info.
    rest = url[match.end():] if (match := _SCHEME.match(url)) else url
    for userinfo in (rest.rpartition("@")[0], re.split(r"[/?#]", rest, maxsplit=1)[0].rpartition("@")[0]):
        if userinfo:
            user, colon, password = userinfo.partition(":")
            found.update({userinfo, password} if colon else {userinfo})
            found.update(re.split(r"[/?#]", password if colon else userinfo))
    return found
