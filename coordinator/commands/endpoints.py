"""Which agent endpoints the leader may call (pure): the admin's allow-list
against server-side request forgery.

The leader POSTs to, and health-checks, every endpoint an agent registers.
So on a secure node an endpoint must be ``host:port`` or an ``http(s)://``
URL without credentials, and:

- a host *name* must match an entry of the allow-list when the list is not
  empty (``svc.example.com``, or ``*.example.com`` for any name below it);
- an *address*, whether written in the endpoint or what a name resolves to
  when the leader connects, must not be special (loopback, link-local with
  the cloud metadata address 169.254.169.254, private, shared, unspecified,
  multicast, reserved; ``localhost`` counts as 127.0.0.1, and the metadata
  host names are always refused) unless a network entry covers it (``127.0.0.0/8``, ``10.1.0.0/16``,
  ``fd00::/8``); when the list is not empty, a written public address must
  be covered by a network entry as well.

The list is empty by default: public names and addresses only. Checked
when an agent registers or changes its endpoint (by the API, before
proposing) and again at every connection the leader makes, on the address
actually connected to (``services.agent_http``), so a name that resolves
somewhere else later (DNS rebinding) is still refused. A node running with
``--allow-anonymous`` checks nothing of this.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Sequence

from coordinator.commands.base import invalid

ALLOW_ENTRIES_MAX = 256
# Names that reach special addresses without DNS saying so.
LOOPBACK_NAMES = ("localhost",)
METADATA_NAMES = ("metadata", "metadata.google.internal", "metadata.goog", "instance-data",
                  "instance-data.ec2.internal")
_NAME_RE = re.compile(r"(\*\.)?([a-z0-9_]([a-z0-9_-]{0,62})\.)*[a-z0-9_][a-z0-9_-]{0,62}\Z")
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def check_allow_entry(value: object, field: str) -> str:
    """An allow-list entry: a network (``10.0.0.0/8``, ``127.0.0.1``, ``::1``)
    or a host name pattern (``api.example.com``, ``*.example.com``),
    returned normalized; ``Rejected`` naming ``field`` otherwise."""
    if not isinstance(value, str) or not value or len(value) > 256:
        raise invalid(field, "must be a network (10.0.0.0/8) or a host name (*.example.com)")
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        pass
    name = value.lower().rstrip(".")
    if not _NAME_RE.match(name):
        raise invalid(field, f"{value!r} is neither a network (10.0.0.0/8) nor a host name (*.example.com)")
    return name


def check_allow_list(value: object, field: str = "endpoint_allow") -> list[str]:
    if not isinstance(value, list) or len(value) > ALLOW_ENTRIES_MAX:
        raise invalid(field, f"must be a list of at most {ALLOW_ENTRIES_MAX} networks and host names")
    return sorted({check_allow_entry(v, f"{field}[{i}]") for i, v in enumerate(value)})


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``(host, port)`` of ``host:port`` or an ``http(s)://`` URL (the host
    lowercased, an IPv6 address without brackets); ``Rejected`` for
    anything else, credentials in the URL included."""
    if "://" in endpoint and not endpoint.startswith(("http://", "https://")):
        raise invalid("endpoint", "must be host:port or an http(s):// URL")
    raw = endpoint if endpoint.startswith(("http://", "https://")) else f"http://{endpoint}"
    try:
        url = urllib.parse.urlsplit(raw)
        host, port = url.hostname, url.port
    except ValueError:
        raise invalid("endpoint", "must be host:port or an http(s):// URL") from None
    if url.scheme not in ("http", "https") or not host:
        raise invalid("endpoint", "must be host:port or an http(s):// URL")
    if url.username is not None or url.password is not None:
        raise invalid("endpoint", "must not carry credentials")
    return host.rstrip("."), port or (443 if url.scheme == "https" else 80)


def is_special(address: Address) -> bool:
    """Loopback, link-local (the metadata address too), private, shared
    (100.64/10), unspecified, multicast or reserved: not on the internet."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not address.is_global or address.is_multicast


def _networks(allow: Sequence[str]) -> list[Network]:
    out = []
    for entry in allow:
        try:
            out.append(ipaddress.ip_network(entry))
        except ValueError:
            continue
    return out


def _covered(address: Address, allow: Sequence[str]) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address.version == net.version and address in net for net in _networks(allow))


def address_refusal(address: str, allow: Sequence[str]) -> str | None:
    """Why the leader may not connect to ``address`` (an IP), or None: a
    special address needs a network entry that covers it."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return f"{address!r} is not an address"
    if is_special(ip) and not _covered(ip, allow):
        return f"{ip} is a loopback, link-local, private or otherwise special address the admin did not allow"
    return None


def endpoint_refusal(endpoint: str, allow: Sequence[str]) -> str | None:
    """Why ``endpoint`` may not be registered or called, or None (see the
    module docstring). ``Rejected`` (400) when it is not an endpoint at all."""
    host, _ = split_endpoint(endpoint)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        refusal = address_refusal(host, allow)
        if refusal is None and allow and not _covered(ip, allow):
            return f"{ip} is not covered by the endpoint allow-list"
        return refusal
    if (host in LOOPBACK_NAMES or host.endswith(".localhost")) and address_refusal("127.0.0.1", allow):
        return f"{host} is a loopback name the admin did not allow"
    if host in METADATA_NAMES:
        return f"{host} is a cloud metadata host name"
    if allow and not any(host == entry or (entry.startswith("*.") and host.endswith(entry[1:]))
                         for entry in allow):
        return f"{host} matches no host name of the endpoint allow-list"
    return None
