"""The address guard: pure classification, then URL checks that resolve on loopback only."""

from __future__ import annotations

import asyncio
import re
import socket
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from pathlib import Path

import aiohttp.helpers
import pytest
from hypothesis import given
from hypothesis import strategies as st

from alertd.errors import ErrorCode, PermanentError
from alertd.netguard import (
    AddressGuard,
    GuardedResolver,
    check_url,
    describe_error,
    literal_address,
    looks_numeric,
    safe_url,
)
from tests.fakes import FakeDns

SETUP_CFG = Path(__file__).resolve().parents[2] / "setup.cfg"
# The first aiohttp seen to refuse non-canonical IPv4 hosts (2130706433, 127.1)
# and to cap the header count, with the is_ip_address that looks_numeric mirrors.
AIOHTTP_TESTED = (3, 14)

OPEN = AddressGuard()
LOOPBACK_ONE = AddressGuard((ip_network("127.0.0.1/32"), ip_network("::1/128")))

FORBIDDEN_V4 = [
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15",
    "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
]
FORBIDDEN_V6 = ["::1/128", "fe80::/10", "fec0::/10", "fc00::/7", "ff00::/8", "2001:db8::/32"]
PUBLIC_V4 = ["8.0.0.0/7", "1.0.0.0/8", "93.184.216.0/24"]
PUBLIC_V6 = ["2a00::/12", "2606:4700::/32", "2001:4860::/32"]


def mapped(v4: IPv4Address) -> IPv6Address:
    return IPv6Address(f"::ffff:{v4}")


def nat64(v4: IPv4Address) -> IPv6Address:
    return IPv6Address(f"64:ff9b::{v4}")


def sixtofour(v4: IPv4Address) -> IPv6Address:
    return IPv6Address((0x2002 << 112) | (int(v4) << 80) | 1)


def teredo(server: IPv4Address, client: IPv4Address) -> IPv6Address:
    # 2001:0000:<server>:<flags>:<port ^ ffff>:<client ^ ffffffff>
    return IPv6Address(
        (0x20010000 << 96) | (int(server) << 64) | (0x8000 << 48) | (0xFFFF << 32)
        | (int(client) ^ 0xFFFFFFFF)
    )


def addresses_in(networks: list[str]) -> st.SearchStrategy[IPv4Address | IPv6Address]:
    return st.one_of(*(st.ip_addresses(network=n) for n in networks))


@pytest.mark.parametrize(("address", "reason"), [
    ("127.0.0.1", "loopback"), ("10.1.2.3", "private"), ("172.31.255.255", "private"),
    ("192.168.1.1", "private"), ("169.254.169.254", "link-local"), ("0.0.0.0", "unspecified"),
    ("100.64.0.1", "shared address space (100.64/10)"), ("224.0.0.251", "multicast"),
    ("255.255.255.255", "private"), ("::", "unspecified"), ("::1", "loopback"),
    ("fe80::1", "link-local"), ("fec0::1", "site-local"), ("fd12:3456::1", "unique-local"),
    ("ff02::1", "multicast"), ("::ffff:127.0.0.1", "IPv4-mapped form of 127.0.0.1, loopback"),
    ("::10.0.0.1", "IPv4-compatible form of 10.0.0.1, private"),
    ("64:ff9b::a9fe:a9fe", "NAT64 form of 169.254.169.254, link-local"),
    ("2002:c0a8:0101::1", "6to4 form of 192.168.1.1, private"),
])
def test_forbidden_addresses_are_refused_with_a_reason(address: str, reason: str) -> None:
    assert OPEN.refusal(ip_address(address)) == reason
    assert not OPEN.is_allowed(ip_address(address))


@pytest.mark.parametrize("address", [
    "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2001:4860:4860::8888",
    "::ffff:8.8.8.8", "64:ff9b::8.8.8.8", "2002:0808:0808::1",
])
def test_public_addresses_and_their_embedded_forms_are_allowed(address: str) -> None:
    assert OPEN.is_allowed(ip_address(address))


def test_a_teredo_address_is_judged_by_its_embedded_server_and_client() -> None:
    public = IPv4Address("8.8.8.8")
    assert OPEN.is_allowed(teredo(public, IPv4Address("1.1.1.1")))
    assert not OPEN.is_allowed(teredo(public, IPv4Address("10.0.0.1")))
    assert not OPEN.is_allowed(teredo(IPv4Address("127.0.0.1"), public))


def test_the_allow_list_admits_its_networks_and_nothing_next_to_them() -> None:
    guard = AddressGuard((ip_network("127.0.0.1/32"), ip_network("fd00::/16")))
    assert guard.is_allowed(ip_address("127.0.0.1"))
    assert guard.is_allowed(ip_address("::ffff:127.0.0.1"))
    assert guard.is_allowed(ip_address("fd00::5"))
    assert not guard.is_allowed(ip_address("127.0.0.2"))
    assert not guard.is_allowed(ip_address("::ffff:127.0.0.2"))
    assert not guard.is_allowed(ip_address("fd01::5"))
    assert not guard.is_allowed(ip_address("::1"))


@given(addresses_in(FORBIDDEN_V4))
def test_every_forbidden_ipv4_and_its_ipv6_forms_are_refused(v4: IPv4Address) -> None:
    assert isinstance(v4, IPv4Address)
    for form in (v4, mapped(v4), nat64(v4), sixtofour(v4)):
        assert not OPEN.is_allowed(form), form


@given(addresses_in(FORBIDDEN_V6))
def test_every_forbidden_ipv6_is_refused(v6: IPv6Address) -> None:
    assert not OPEN.is_allowed(v6)


@given(st.sampled_from(FORBIDDEN_V4).flatmap(
    lambda net: st.tuples(st.just(net), st.ip_addresses(network=net))))
def test_a_forbidden_ipv4_inside_an_allow_network_passes_in_every_form(
    case: tuple[str, IPv4Address],
) -> None:
    network, v4 = case
    guard = AddressGuard((ip_network(network),))
    assert isinstance(v4, IPv4Address)
    for form in (v4, mapped(v4), nat64(v4), sixtofour(v4)):
        assert guard.is_allowed(form), form


@given(st.ip_addresses(), st.integers(min_value=0, max_value=128))
def test_any_address_inside_an_allow_network_passes(
    address: IPv4Address | IPv6Address, prefix: int,
) -> None:
    network = ip_network(f"{address}/{min(prefix, address.max_prefixlen)}", strict=False)
    assert AddressGuard((network,)).is_allowed(address)


@given(addresses_in(PUBLIC_V4 + PUBLIC_V6))
def test_public_samples_pass_with_an_empty_allow_list(address: IPv4Address | IPv6Address) -> None:
    assert OPEN.is_allowed(address)
    if isinstance(address, IPv4Address):
        assert OPEN.is_allowed(mapped(address))
        assert OPEN.is_allowed(nat64(address))


@given(st.ip_addresses(v=4, network="127.0.0.0/8").filter(lambda a: str(a) != "127.0.0.1"))
def test_allowing_one_loopback_address_refuses_the_rest_of_127_slash_8(v4: IPv4Address) -> None:
    assert not LOOPBACK_ONE.is_allowed(v4)
    assert not LOOPBACK_ONE.is_allowed(mapped(v4))


def test_literal_address_parses_only_canonical_literals() -> None:
    assert literal_address("127.0.0.2") == ip_address("127.0.0.2")
    assert literal_address("[::ffff:127.0.0.2]") == ip_address("::ffff:127.0.0.2")
    assert literal_address("2130706434") is None  # left to the resolver, which knows
    assert literal_address("localhost") is None


@pytest.mark.parametrize("host", [
    "127.0.0.2", "2130706434", "0x7f000002", "0177.0.0.2", "[::ffff:127.0.0.2]", "[::1%25lo]",
])
async def test_every_spelling_of_a_forbidden_loopback_address_is_refused(host: str) -> None:
    guard = AddressGuard((ip_network("127.0.0.1/32"),))
    with pytest.raises(PermanentError) as info:
        await check_url(f"http://{host}:8080/clip.mp4", guard)
    assert info.value.code is ErrorCode.FORBIDDEN_ADDRESS


@pytest.mark.parametrize("host", [
    "127.0.0.1", "2130706433", "0x7f.1", "127.1", "[::ffff:127.0.0.1]", "localhost",
])
async def test_every_spelling_of_the_allowed_address_passes(host: str) -> None:
    await check_url(f"http://{host}:8080/clip.mp4", LOOPBACK_ONE)


async def test_a_name_is_refused_naming_the_host_and_the_address() -> None:
    with pytest.raises(PermanentError) as info:
        await check_url("https://localhost/x", OPEN)
    assert info.value.message.startswith("localhost (")
    assert "loopback" in info.value.message


@pytest.mark.parametrize("refused", ["127.0.0.2", "::1"])
async def test_a_mixed_answer_keeps_only_the_allowed_addresses_for_the_connection(
    monkeypatch: pytest.MonkeyPatch, refused: str,
) -> None:
    # localhost on a stock Debian host (::1 and 127.0.0.1) with the README's 127.0.0.1/32.
    guard = AddressGuard((ip_network("127.0.0.1/32"),))
    loop = asyncio.get_running_loop()
    monkeypatch.setattr(loop, "getaddrinfo", FakeDns({"mixed.test": [refused, "127.0.0.1"]}))
    await check_url("http://mixed.test/", guard)
    results = await GuardedResolver(guard).resolve("mixed.test", 8080, socket.AF_UNSPEC)
    assert [r["host"] for r in results] == ["127.0.0.1"]


async def test_an_answer_with_every_address_refused_is_refused_naming_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()
    monkeypatch.setattr(loop, "getaddrinfo", FakeDns({"private.test": ["127.0.0.2", "10.0.0.1"]}))
    for attempt in (check_url("http://private.test/", LOOPBACK_ONE),
                    GuardedResolver(LOOPBACK_ONE).resolve("private.test", 80, socket.AF_UNSPEC)):
        with pytest.raises(PermanentError) as info:
            await attempt
        assert info.value.code is ErrorCode.FORBIDDEN_ADDRESS
        assert info.value.message.startswith("private.test (127.0.0.2) is loopback")


async def test_a_numeric_spelling_is_refused_if_any_answer_is_since_nothing_pins_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()
    monkeypatch.setattr(loop, "getaddrinfo", FakeDns({"2130706433": ["127.0.0.1", "127.0.0.2"]}))
    with pytest.raises(PermanentError) as info:
        await check_url("http://2130706433/", LOOPBACK_ONE, resolve_names=False)
    assert "127.0.0.2" in info.value.message


async def test_names_are_left_to_the_resolver_but_numeric_spellings_are_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()
    dns = FakeDns({"2130706434": ["127.0.0.2"]})
    monkeypatch.setattr(loop, "getaddrinfo", dns)
    await check_url("http://clips.test/", LOOPBACK_ONE, resolve_names=False)
    with pytest.raises(PermanentError):
        await check_url("http://2130706434/", LOOPBACK_ONE, resolve_names=False)
    assert dns.numeric_lookups == ["2130706434"] and dns.lookups == []


@pytest.mark.parametrize("host", ["127.0.0.2.", "127.0.0.1.", "2130706434.", "1.2.3.4.5"])
async def test_a_numeric_looking_host_that_is_no_number_is_an_invalid_url_never_sent_to_dns(
    monkeypatch: pytest.MonkeyPatch, host: str,
) -> None:
    # glibc would send "127.0.0.2." to a DNS server: a query leaving the machine.
    dns = FakeDns({})  # any lookup but a numeric-only one fails the test
    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", dns)
    for resolve_names in (True, False):
        with pytest.raises(ValueError, match="looks like an IP address but is not one"):
            await check_url(f"http://{host}:8080/clip.mp4", LOOPBACK_ONE,
                            resolve_names=resolve_names)
    assert dns.lookups == []


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x", "file:///etc/passwd", "http:///nohost"])
async def test_urls_without_http_scheme_or_host_are_refused(url: str) -> None:
    with pytest.raises(PermanentError) as info:
        await check_url(url, LOOPBACK_ONE)
    assert info.value.code is ErrorCode.FORBIDDEN_ADDRESS


async def test_the_resolver_returns_only_vetted_addresses_for_aiohttp_to_connect_to() -> None:
    resolver = GuardedResolver(LOOPBACK_ONE)
    results = await resolver.resolve("localhost", 8080, socket.AF_UNSPEC)
    assert results
    assert {r["host"] for r in results} <= {"127.0.0.1", "::1"}
    assert all(r["port"] == 8080 and r["hostname"] == "localhost" for r in results)
    with pytest.raises(PermanentError):
        await resolver.resolve("0x7f000002", 8080, socket.AF_INET)


def test_safe_url_and_error_text_drop_query_and_credentials() -> None:
    assert safe_url("https://u:p@cdn.test:8443/a/b.mp4?sig=SECRET#t") == (
        "https://cdn.test:8443/a/b.mp4")
    text = describe_error(ValueError("bad https://cdn.test/x?token=SECRET here"))
    assert "SECRET" not in text and "https://cdn.test/x" in text


def test_setup_cfg_requires_the_aiohttp_release_whose_host_handling_the_guard_mirrors() -> None:
    floor = re.search(r"^\s*aiohttp>=(\d+)\.(\d+)", SETUP_CFG.read_text(), re.MULTILINE)
    assert floor is not None
    assert (int(floor[1]), int(floor[2])) >= AIOHTTP_TESTED
    for host in ("127.0.0.1", "127.0.0.2.", "2130706433", "0x7f000001", "::1", "clips.test"):
        assert looks_numeric(host) == aiohttp.helpers.is_ip_address(host), host
