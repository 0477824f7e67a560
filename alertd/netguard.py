"""Outbound address policy: refuse URLs and DNS answers that point into private networks.

Every URL alertd fetches or posts to comes from a message, so it is
attacker-controlled. The policy is applied to the addresses a name RESOLVES
to, never to the spelling of the host: glibc maps ``2130706433``, ``0x7f.1``
or ``127.1`` onto 127.0.0.1, and only the resolved address tells the truth.
The aiohttp connector uses :class:`GuardedResolver`, so it connects only to
the addresses that were vetted (no second lookup, no DNS-rebinding gap); a
refused answer is dropped and the host refused only when none is left.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from alertd.errors import ErrorCode, PermanentError

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

# IANA special-purpose ranges that Python's flags do not all cover (or cover
# differently across patch releases); checked in addition to those flags.
_SPECIAL_V4 = tuple(ipaddress.IPv4Network(n) for n in (
    "0.0.0.0/8", "100.64.0.0/10", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24",
    "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "240.0.0.0/4",
))
_SPECIAL_V6 = tuple(ipaddress.IPv6Network(n) for n in (
    "100::/64", "64:ff9b:1::/48", "2001::/23", "2001:db8::/32", "3fff::/20", "5f00::/16",
))
_SHARED_V4 = ipaddress.IPv4Network("100.64.0.0/10")
_UNIQUE_LOCAL_V6 = ipaddress.IPv6Network("fc00::/7")
_NAT64_V6 = ipaddress.IPv6Network("64:ff9b::/96")
_URL_IN_TEXT = re.compile(r"https?://[^\s'\"<>]+")


class AddressGuard:
    """Decides whether alertd may connect to an address; pure, no I/O."""

    def __init__(self, allow_networks: tuple[IPNetwork, ...] = ()) -> None:
        self.allow_networks = allow_networks

    def is_allowed(self, ip: IPAddress) -> bool:
        return self.refusal(ip) is None

    def refusal(self, ip: IPAddress) -> str | None:
        """Why ``ip`` is refused (e.g. ``"loopback"``), or None when it is allowed."""
        if self._in_allow_list(ip):
            return None
        if isinstance(ip, IPv6Address):
            embedded = _embedded_ipv4(ip)
            if embedded:
                # These forms carry an IPv4 destination (mapped sockets, NAT64,
                # tunnels); judging it closes the bypass of writing 127.0.0.1
                # as ::ffff:7f00:1, and lets the allow list name plain IPv4.
                for form, v4 in embedded:
                    reason = self.refusal(v4)
                    if reason is not None:
                        return f"{form} of {v4}, {reason}"
                return None
            return _v6_refusal(ip)
        return _v4_refusal(ip)

    def check(self, host: str, ip: IPAddress) -> None:
        """Raise ``PermanentError(forbidden_address)`` naming host and address if refused."""
        reason = self.refusal(ip)
        if reason is not None:
            shown = host if host == str(ip) else f"{host} ({ip})"
            raise PermanentError(
                ErrorCode.FORBIDDEN_ADDRESS,
                f"{shown} is {reason}; refused (not in --allow-network)",
            )

    def _in_allow_list(self, ip: IPAddress) -> bool:
        # ``in`` is False across versions, so a v4 network never matches a v6 address.
        return any(ip in net for net in self.allow_networks)


def _embedded_ipv4(ip: IPv6Address) -> list[tuple[str, IPv4Address]]:
    if ip.ipv4_mapped is not None:
        return [("IPv4-mapped form", ip.ipv4_mapped)]
    if int(ip) >> 32 == 0 and int(ip) > 1:
        # IPv4-compatible ::a.b.c.d; :: and ::1 are judged as themselves below.
        return [("IPv4-compatible form", IPv4Address(int(ip) & 0xFFFFFFFF))]
    if ip in _NAT64_V6:
        return [("NAT64 form", IPv4Address(int(ip) & 0xFFFFFFFF))]
    if ip.sixtofour is not None:
        return [("6to4 form", ip.sixtofour)]
    if ip.teredo is not None:
        server, client = ip.teredo
        return [("Teredo server", server), ("Teredo client", client)]
    return []


def _v4_refusal(ip: IPv4Address) -> str | None:
    checks = (
        (ip.is_unspecified, "unspecified"),
        (ip.is_loopback, "loopback"),
        (ip.is_link_local, "link-local"),
        (ip.is_multicast, "multicast"),
        (ip in _SHARED_V4, "shared address space (100.64/10)"),
        (ip.is_private, "private"),
        (ip.is_reserved, "reserved"),
        (any(ip in net for net in _SPECIAL_V4), "special-purpose"),
        (not ip.is_global, "not globally routable"),
    )
    return next((reason for hit, reason in checks if hit), None)


def _v6_refusal(ip: IPv6Address) -> str | None:
    checks = (
        (ip.is_unspecified, "unspecified"),
        (ip.is_loopback, "loopback"),
        (ip.is_link_local, "link-local"),
        (ip.is_site_local, "site-local"),
        (ip in _UNIQUE_LOCAL_V6, "unique-local"),
        (ip.is_multicast, "multicast"),
        (ip.is_reserved, "reserved"),
        (ip.is_private, "private"),
        (any(ip in net for net in _SPECIAL_V6), "special-purpose"),
        (not ip.is_global, "not globally routable"),
    )
    return next((reason for hit, reason in checks if hit), None)


def literal_address(host: str) -> IPAddress | None:
    """The address a canonical IP literal host names (brackets allowed), else None."""
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return ipaddress.ip_address(text.replace("%25", "%"))
    except ValueError:
        return None


def looks_numeric(host: str) -> bool:
    """True when aiohttp would take ``host`` as an IP and skip the resolver.

    Mirrors ``aiohttp.helpers.is_ip_address``: such a host must be checked by
    us, because the guarded resolver never sees it.
    """
    return ":" in host or host.replace(".", "").isdigit()


def hop_host(url: URL) -> str:
    """The host aiohttp will connect to, after checking scheme and host are usable."""
    if url.scheme not in ("http", "https"):
        raise PermanentError(
            ErrorCode.FORBIDDEN_ADDRESS,
            f"URL scheme {url.scheme!r} is not allowed (http/https only)",
        )
    if not url.raw_host:
        raise PermanentError(ErrorCode.FORBIDDEN_ADDRESS, "URL has no host")
    return url.raw_host


async def check_url(url: str | URL, guard: AddressGuard, *, resolve_names: bool = True) -> None:
    """Check one hop: scheme, host, and every address the host stands for.

    A literal IP is checked as is. A name is resolved and refused when no
    answer is allowed, as :class:`GuardedResolver` does at connect time; with
    ``resolve_names=False`` names are left to it. Numeric spellings are
    checked here whatever ``resolve_names`` says, since aiohttp skips the
    resolver for them; one that is not a number raises ``ValueError``, which
    callers report as an invalid URL.
    """
    target = url if isinstance(url, URL) else URL(url)
    host = hop_host(target)
    ip = literal_address(host)
    if ip is not None:
        guard.check(host, ip)
    elif looks_numeric(host):
        await _check_numeric(guard, host, target.port or 0)
    elif resolve_names:
        await resolve_checked(guard, host, target.port or 0)


async def _check_numeric(guard: AddressGuard, host: str, port: int) -> None:
    # AI_NUMERICHOST: glibc does not take every numeric-looking spelling for a
    # number ("127.0.0.2." with a trailing dot); without the flag it would send
    # those to DNS, a query leaving the machine for a host that is no name.
    try:
        answers = await _lookup(host, port, socket.AF_UNSPEC, socket.AI_NUMERICHOST)
    except socket.gaierror:
        raise ValueError(f"host {host!r} looks like an IP address but is not one") from None
    # Refused if ANY answer is: nothing pins aiohttp's connection to the ones we allowed.
    for _, _, ip in answers:
        guard.check(host, ip)


async def resolve_checked(
    guard: AddressGuard, host: str, port: int, family: int = socket.AF_UNSPEC,
) -> list[tuple[socket.AddressFamily, int, IPAddress]]:
    """Resolve ``host`` and return (family, proto, address) for each answer the guard allows.

    Refused answers are dropped: safe only because the caller connects to the
    returned addresses and nothing else (:class:`GuardedResolver`). So
    ``localhost`` = ::1 + 127.0.0.1 with 127.0.0.1/32 allowed goes to 127.0.0.1.
    Raises ``PermanentError(forbidden_address)`` naming a refused address when
    no answer is left, and ``OSError`` (``socket.gaierror``) when the name
    does not resolve.
    """
    answers = await _lookup(host, port, family)
    allowed = [answer for answer in answers if guard.is_allowed(answer[2])]
    if answers and not allowed:
        guard.check(host, answers[0][2])
    return allowed


async def _lookup(
    host: str, port: int, family: int, flags: int = 0,
) -> list[tuple[socket.AddressFamily, int, IPAddress]]:
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, family=family, type=socket.SOCK_STREAM, flags=flags,
    )
    return [(fam, proto, _sockaddr_ip(sockaddr)) for fam, _, proto, _, sockaddr in infos]


def _sockaddr_ip(sockaddr: tuple[object, ...]) -> IPAddress:
    # glibc returns the bare address (an IPv6 scope id sits apart in sockaddr[3]).
    return ipaddress.ip_address(str(sockaddr[0]).split("%")[0])


class GuardedResolver(AbstractResolver):
    """aiohttp resolver that returns only vetted addresses, so connections are pinned to them."""

    def __init__(self, guard: AddressGuard) -> None:
        self._guard = guard

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET,
    ) -> list[ResolveResult]:
        answers = await resolve_checked(self._guard, host, port, family)
        return [
            ResolveResult(
                hostname=host, host=str(ip), port=port, family=fam, proto=proto,
                flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
            )
            for fam, proto, ip in answers
        ]

    async def close(self) -> None:
        return None


def safe_url(url: str | URL) -> str:
    """``scheme://host[:port]/path`` for messages and logs: signed URLs carry secrets
    in the query string and sometimes in userinfo, so both are dropped."""
    try:
        target = url if isinstance(url, URL) else URL(url)
        return str(target.with_user(None).with_query(None).with_fragment(None))
    except (ValueError, TypeError):
        return "<unparseable URL>"



def origin_of(url: str | URL) -> str:
    """``scheme://host[:port]`` only: webhook URLs (Slack's, Discord's) carry
    their secret in the path, so nothing past the authority is shown."""
    try:
        target = url if isinstance(url, URL) else URL(url)
        return str(target.origin())
    except (ValueError, TypeError):
        return "<unparseable URL>"


def describe_error(exc: BaseException, *, path_is_secret: bool = False) -> str:
    """Exception text safe to store and log: URLs inside it go through :func:`safe_url`,
    or are cut to their origin when ``path_is_secret``."""
    text = str(exc) or type(exc).__name__
    shown = origin_of if path_is_secret else safe_url
    return _URL_IN_TEXT.sub(lambda m: shown(m.group()), text)
