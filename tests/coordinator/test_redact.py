"""``redact_url`` and ``scrub``: no password, token or query secret of a
broker URL ever shows, whatever the URL looks like, and what cannot be taken
apart is hidden whole."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.redact import redact_url, scrub, url_secrets

# The secret part of every generated URL carries this; nothing else can spell it.
MARK = "Zq9SECRETq9Z"

SCHEMES = ("redis", "rediss", "amqp", "amqps", "nats", "tls", "memory", "http")
HOSTS = st.one_of(
    st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z]{2,5}){0,2}", fullmatch=True),
    st.from_regex(r"(25[0-5]|1?[0-9]{1,2})(\.(25[0-5]|1?[0-9]{1,2})){3}", fullmatch=True),
    st.sampled_from(["[::1]", "[fe80::1%25eth0]", "[2001:db8::7]"]),
)
PORTS = st.one_of(st.just(""), st.integers(1, 65535).map(lambda port: f":{port}"))
PATHS = st.sampled_from(["", "/", "/0", "/%2F", "/vhost", "/a/b"])
USERS = st.from_regex(r"[a-z][a-z0-9_.-]{0,8}", fullmatch=True)
# Anything at all around the mark, as a careless operator might paste it.
NOISE = st.text(max_size=12)


@st.composite
def secrets(draw: st.DrawFn) -> str:
    return draw(NOISE) + MARK + draw(NOISE)


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("memory://", "memory://"),
    ("nats://[::1]:4222", "nats://[::1]:4222"),
    ("memory://user:s3cret@broker:1", "memory://user:***@broker:1"),
    ("amqp://guest:guest@127.0.0.1:5672/", "amqp://guest:***@127.0.0.1:5672/"),
    ("amqps://guest:pw@[::1]:5671/%2F?heartbeat=30", "amqps://guest:***@[::1]:5671/%2F?heartbeat=***"),
    ("rediss://:pw@host:6380/0", "rediss://:***@host:6380/0"),
    ("redis://user:@host", "redis://***@host"),  # an API key as the user name, with no password
    ("nats://t0ken@host:4222", "nats://***@host:4222"),  # a user part alone may be a token
    ("nats://@host", "nats://***@host"),
    ("redis://:p@ss@host/0", "redis://:***@host/0"),  # an unescaped "@" in the password
    ("redis://host/0?password=pw&db=1", "redis://host/0?password=***&db=***"),
    ("redis://host/0?pw&=x&a%3Db=c", "redis://host/0?***&***&***"),
    ("http://host/path#access_token=t", "http://host/path#***"),
    ("nats://u:p@h1:4222, nats://tok@h2:4222,tls://h3", "nats://u:***@h1:4222,nats://***@h2:4222,tls://h3"),
    ("redis://:a,b@host", "redis://:***@host"),  # a comma in a password is not a server list
    ("redis://:pa/ss@host", "redis://<redacted>"),  # "/" in a password: the rest spills into the path
    ("redis://:pa?ss@host", "redis://<redacted>"),
    ("redis://:pa#ss@host", "redis://<redacted>"),
    ("REDIS://[::1", "redis://<redacted>"),
    ("amqp://guest:pw@host:notaport/", "amqp://<redacted>"),
    ("nats://u:p@h1,nats://[::1", "nats://u:***@h1,nats://<redacted>"),
    ("user:pw@host:6379", "<redacted>"),
    ("no-scheme", "<redacted>"),
    ("", "<redacted>"),
])
def test_known_urls(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@given(st.sampled_from(SCHEMES), st.one_of(st.none(), USERS), secrets(), st.booleans(), HOSTS, PORTS, PATHS)
def test_a_password_or_token_never_shows(scheme: str, user: str | None, secret: str, escaped: bool, host: str,
                                         port: str, path: str) -> None:
    if user is None:  # the whole user part is a token: a ":" in it would make what precedes a user name
        secret = secret.replace(":", "")
    written = quote(secret, safe="") if escaped else secret
    userinfo = written if user is None else f"{user}:{written}"
    url = f"{scheme}://{userinfo}@{host}{port}{path}"
    shown = redact_url(url)
    assert MARK not in shown
    if escaped:  # a well-formed URL keeps what tells the broker apart
        assert shown == f"{scheme}://{'***' if user is None else user + ':***'}@{host}{port}{path}"
    message = f"cannot connect to {url}: auth failed for {secret!r} ({written}, {url.upper()})"
    assert MARK not in scrub(message, url).upper()


@given(st.sampled_from(SCHEMES), NOISE, st.booleans(), secrets(), st.text(max_size=20).filter(lambda t: "@" not in t))
def test_whatever_stands_in_the_user_info_never_shows(scheme: str, before: str, colon: bool, secret: str,
                                                      tail: str) -> None:
    # Any text at all, as long as the mark lies where a reader that takes the user-info
    # to the last "@" would find the password (after a ":") or a token (no ":").
    userinfo = f"{before}:{secret}" if colon else f"{before}{secret}".replace(":", "")
    url = f"{scheme}://{userinfo}@{tail}".replace(",", "")
    assert MARK not in redact_url(url)
    assert MARK not in scrub(f"failed: {url}", url)


@given(HOSTS, st.text(max_size=12), secrets(), st.one_of(st.just(""), st.text(max_size=12).map("&".__add__)))
def test_query_values_never_show(host: str, key: str, secret: str, more: str) -> None:
    url = f"redis://{host}/0?{key}={secret}{more}"
    assert MARK not in redact_url(url)


@given(HOSTS, secrets())
def test_a_fragment_never_shows(host: str, secret: str) -> None:
    assert MARK not in redact_url(f"http://{host}/#{secret}")


@given(st.lists(st.tuples(st.sampled_from(["nats", "tls"]), st.one_of(st.none(), USERS), HOSTS, PORTS),
                min_size=2, max_size=4), secrets())
def test_every_server_of_a_list_is_redacted(servers: list[tuple[str, str | None, str, str]], secret: str) -> None:
    written = quote(secret, safe="")
    urls = [f"{scheme}://{written if user is None else f'{user}:{written}'}@{host}{port}"
            for scheme, user, host, port in servers]
    shown = redact_url(",".join(urls))
    assert MARK not in shown
    assert shown.count(",") == len(servers) - 1
    assert all(f"@{host}{port}" in shown for _, _, host, port in servers)


@given(st.text())
def test_any_text_is_handled(text: str) -> None:
    assert isinstance(redact_url(text), str)
    assert isinstance(scrub(text, text), str)
    assert all(url_secrets(text))


def test_scrub_keeps_a_message_readable() -> None:
    url = "redis://app:hunter22@cache:6379/0?timeout=30"
    text = f"Error 111 connecting to {url}: timeout 30 exceeded, auth hunter22 refused (nats://x:y@elsewhere)"
    assert scrub(text, url) == ("Error 111 connecting to redis://app:***@cache:6379/0?timeout=***: timeout 30 "
                                "exceeded, auth *** refused (nats://***@elsewhere)")


def test_scrub_finds_the_pieces_of_a_url_that_cannot_be_taken_apart() -> None:
    url = "redis://:pass/word@cache"
    text = "invalid database: word@cache; auth with pass/word"
    assert scrub(text, url) == "invalid database: ***@cache; auth with ***"
