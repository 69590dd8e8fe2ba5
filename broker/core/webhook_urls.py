"""The webhooks' SSRF guard: a webhook goes out over http or https, and every address its host
resolves to must be public, unless ``webhooks.allow`` names the host or a CIDR holding the
address. A cloud metadata address passes only when listed exactly (a wide CIDR does not open it).

Checked when a job or batch naming a webhook is submitted (a typed ``InvalidMessage``, not a
silent drop), and again by the dispatcher at each attempt and as it connects: DNS can change.
Messages name the host, never the whole URL (its path or query may hold a token).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlsplit

from broker.core.errors import InvalidMessage
from broker.core.webhooks import WebhooksConfig

__all__ = [
    "METADATA_ADDRESSES",
    "METADATA_HOSTS",
    "RESOLVE_TIMEOUT_S",
    "UnresolvableHost",
    "WebhookRefused",
    "address_refusal",
    "check_webhook",
    "check_webhook_url",
    "refuse_addresses",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, Oracle
        "169.254.170.2",  # AWS ECS task metadata
        "fd00:ec2::254",  # AWS over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "168.63.129.16",  # Azure's platform address (a public one)
    )
)
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata"})
RESOLVE_TIMEOUT_S = 5.0
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class WebhookRefused(InvalidMessage):
    """A job's or batch's webhook refused when it was submitted: its result is not sent there.
    ``field`` names it (HTTP answers give it as the error's ``param``)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


class UnresolvableHost(InvalidMessage):
    """The host did not resolve: refused at submission; at an attempt, a failure to retry (a DNS
    outage passes)."""


@dataclass(frozen=True, slots=True)
class _Allowed:
    hosts: frozenset[str]
    networks: tuple[IPNetwork, ...]


@lru_cache(maxsize=32)
def _allowed(entries: tuple[str, ...]) -> _Allowed:
    hosts, networks = set(), []
    for entry in entries:
        bare = entry.strip().strip("[]").rstrip(".").lower()
        try:
            networks.append(ipaddress.ip_network(bare, strict=False))
        except ValueError:
            hosts.add(bare)
    return _Allowed(frozenset(hosts), tuple(networks))


def _embedded_v4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, 6to4, NAT64): it is where it leads."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _kind(ip: IPAddress) -> str | None:
    """What makes an address unfit for a webhook, or None for a public one."""
    checks = (
        (ip in METADATA_ADDRESSES, "cloud metadata"),
        (ip.is_unspecified, "unspecified"),
        (ip.is_loopback, "loopback"),
        (ip.is_link_local, "link-local"),
        (ip.is_multicast, "multicast"),
        (ip.is_private, "private"),
        (ip.is_reserved, "reserved"),
        (not ip.is_global, "special-purpose (not public)"),
    )
    return next((kind for refused, kind in checks if refused), None)


def address_refusal(address: str | IPAddress, allow: Sequence[str]) -> str | None:
    """Why a webhook may not connect to ``address`` (``"loopback"``, ``"private"``, ...), or
    None when it may: public, or in ``allow`` (a metadata address only listed exactly)."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    inner = _embedded_v4(ip)
    kind = _kind(ip if inner is None else inner)
    if kind is None:
        return None
    networks = _allowed(tuple(allow)).networks
    for candidate in (ip, inner) if inner is not None else (ip,):
        for net in networks:
            exact = net.num_addresses == 1
            if candidate in net and (exact or kind != "cloud metadata"):
                return None
    return kind


def refuse_addresses(
    host: str, addresses: Sequence[str], allow: Sequence[str], *, field: str = "webhook"
) -> None:
    """Raise ``InvalidMessage`` for the first of ``host``'s addresses a webhook may not reach."""
    if host in _allowed(tuple(allow)).hosts:
        return
    for address in addresses:
        kind = address_refusal(address.split("%", 1)[0], allow)  # an IPv6 zone is no part
        if kind is None:
            continue
        # A name's addresses are not told: the answer would map an internal network's names.
        what = f"{address} is" if address == host else f"{host} resolves to"
        how = "exactly" if kind == "cloud metadata" else "the host or a CIDR holding it"
        raise InvalidMessage(
            f"{field}: {what} a {kind} address: refused (SSRF guard); "
            f"to allow it, list {how} in webhooks.allow"
        )


async def check_webhook_url(url: str, allow: Sequence[str], *, field: str = "webhook") -> None:
    """Refuse (``InvalidMessage``, naming ``field``) a URL that is not http(s), or whose host
    resolves to any address a webhook may not reach; ``UnresolvableHost`` if it does not
    resolve. Resolves on the running loop (never blocking it)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidMessage(f"{field}: not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidMessage(f"{field}: only http and https URLs may be webhooks")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise InvalidMessage(f"{field}: the URL names no host")
    if host in _allowed(tuple(allow)).hosts:
        return
    if host in METADATA_HOSTS:
        raise InvalidMessage(
            f"{field}: {host} is a cloud metadata host: refused (SSRF guard); "
            "to allow it, list it exactly in webhooks.allow"
        )
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        addresses = await _resolve(host, port or (443 if parts.scheme == "https" else 80), field)
    refuse_addresses(host, addresses, allow, field=field)


async def check_webhook(url: str, config: WebhooksConfig, *, field: str = "webhook") -> None:
    """What a job or batch naming a webhook is checked for when submitted: a secret to sign
    it with (the section's or its endpoint's), and a URL the guard lets through."""
    if not config.secrets_for(url):
        raise WebhookRefused(
            f"{field}: no webhooks.secret is configured to sign webhooks with; "
            "this Switchyard sends none",
            field,
        )
    try:
        await check_webhook_url(url, config.allow, field=field)
    except InvalidMessage as exc:
        raise WebhookRefused(exc.message, field) from None


async def _resolve(host: str, port: int, field: str) -> list[str]:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT_S):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except TimeoutError:
        raise UnresolvableHost(
            f"{field}: {host} did not resolve within {RESOLVE_TIMEOUT_S:g} s"
        ) from None
    except (OSError, UnicodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise UnresolvableHost(f"{field}: {host} does not resolve ({why})") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise UnresolvableHost(f"{field}: {host} does not resolve (no address)")
    return addresses
