"""The client address behind proxies (core/client_address.py): trust lists, X-Forwarded-For read
as an attacker would write it, and PROXY protocol v1/v2 headers fed byte by byte."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from igratech_ws.core.client_address import (
    DEFAULT_TRUSTED_PROXIES,
    MAX_FORWARDED_HOPS,
    MAX_PROXY_HEADER_BYTES,
    PROXY_V2_SIGNATURE,
    ClientAddress,
    ProxyHeader,
    ProxyHeaderMissing,
    ProxyProtocolError,
    TrustedProxies,
    client_from_forwarded_for,
    parse_ip,
    parse_proxy_header,
    resolve,
    starts_with_proxy_header,
)

DEFAULTS = TrustedProxies.parse(DEFAULT_TRUSTED_PROXIES)
NGINX = TrustedProxies.parse("192.0.2.10")

# --- trust lists ------------------------------------------------------------------------------


def test_addresses_and_networks_are_trusted_and_nothing_else() -> None:
    trusted = TrustedProxies.parse(" 10.0.0.0/8, 192.0.2.7 ,2001:db8::/32,")
    assert "10.200.3.4" in trusted and "192.0.2.7" in trusted and "2001:db8::5" in trusted
    assert "192.0.2.8" not in trusted and "11.0.0.1" not in trusted and "2001:db9::1" not in trusted
    assert "::ffff:10.1.2.3" in trusted  # a dual-stack socket's view of an IPv4 peer
    assert "not-an-ip" not in trusted and "" not in trusted and None not in trusted


def test_empty_trusts_nobody() -> None:
    assert "127.0.0.1" not in TrustedProxies.parse("")
    assert resolve("127.0.0.1", TrustedProxies.parse(""), forwarded_for=["1.2.3.4"]).address == (
        "127.0.0.1"
    )


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("10.0.0.1/8", "has host bits set"),
        ("10.0.0.0/33", "is not an address"),
        ("nginx", "is not an address"),
    ],
)
def test_bad_entries_are_named(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words) as caught:
        TrustedProxies.parse(f"127.0.0.1,{text}")
    assert repr(text) in str(caught.value)


def test_the_defaults_are_loopback_and_private_networks() -> None:
    for private in (
        "127.0.0.1",
        "::1",
        "10.1.2.3",
        "172.16.0.1",
        "172.31.255.255",
        "192.168.1.1",
        "fd00::1",
    ):
        assert private in DEFAULTS, private
    for public in ("8.8.8.8", "172.32.0.1", "2001:4860::8888", "100.64.0.1"):
        assert public not in DEFAULTS, public


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.2.3.4", "1.2.3.4"),
        (" 1.2.3.4 ", "1.2.3.4"),
        ("1.2.3.4:5678", "1.2.3.4"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("2001:DB8::1", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("::ffff:203.0.113.9", "203.0.113.9"),
        ("unknown", None),
        ("_hidden", None),
        ("", None),
        ("[2001:db8::1", None),
        ("1.2.3.4.5", None),
        ("01.2.3.4", None),
        ("9" * 100, None),
    ],
)
def test_parse_ip_reads_what_proxies_write(text: str, expected: str | None) -> None:
    address = parse_ip(text)
    assert (str(address) if address is not None else None) == expected


# --- X-Forwarded-For --------------------------------------------------------------------------


def test_an_untrusted_peer_cannot_choose_its_address() -> None:
    client = resolve("203.0.113.9", DEFAULTS, forwarded_for=["1.1.1.1"], proxy_source="2.2.2.2")
    assert client == ClientAddress("203.0.113.9", "203.0.113.9", False, "203.0.113.9")


def test_behind_nginx_the_client_is_the_address_nginx_appended() -> None:
    # The client sent "X-Forwarded-For: 6.6.6.6" itself; nginx appended the address it saw.
    client = resolve("192.0.2.10", NGINX, forwarded_for=["6.6.6.6, 203.0.113.9"])
    assert client == ClientAddress("203.0.113.9", "192.0.2.10", True, "203.0.113.9")


def test_a_chain_of_trusted_proxies_is_walked_from_the_right() -> None:
    trusted = TrustedProxies.parse("10.0.0.0/8")
    values = ["6.6.6.6", "203.0.113.9, 10.0.0.5", "10.0.0.6"]  # several headers, then entries
    assert client_from_forwarded_for(values, trusted) == "203.0.113.9"
    assert resolve("10.0.0.7", trusted, forwarded_for=values).limit_key == "203.0.113.9"


def test_a_client_inside_the_trusted_network_is_the_left_most_entry() -> None:
    assert client_from_forwarded_for(["10.0.0.3, 10.0.0.4"], DEFAULTS) == "10.0.0.3"


@pytest.mark.parametrize(
    "header", ["", " , ", "unknown", "203.0.113.9, garbage", "garbage, 10.0.0.1, x"]
)
def test_an_unusable_header_names_nobody_and_the_proxy_is_exempt_from_the_limit(
    header: str,
) -> None:
    client = resolve("10.0.0.1", DEFAULTS, forwarded_for=[header])
    assert client == ClientAddress("10.0.0.1", "10.0.0.1", False, None)


def test_forged_entries_left_of_an_unparseable_one_are_not_believed() -> None:
    # "garbage" is right of the forged address: the chain is broken there.
    assert client_from_forwarded_for(["1.2.3.4, garbage"], NGINX) is None


def test_a_trusted_peer_without_a_header_is_exempt_but_logged_as_itself() -> None:
    assert resolve("127.0.0.1", DEFAULTS) == ClientAddress("127.0.0.1", "127.0.0.1", False, None)


def test_with_the_defaults_one_proxy_address_is_never_counted_by_the_limit() -> None:
    # nginx on the same host, no X-Forwarded-For: every connection has the same peer.
    keys = {resolve("127.0.0.1", DEFAULTS).limit_key for _ in range(5000)}
    assert keys == {None}


def test_the_number_of_hops_read_is_bounded() -> None:
    long_chain = ", ".join(["10.0.0.9"] * (MAX_FORWARDED_HOPS + 5))
    assert client_from_forwarded_for([long_chain], DEFAULTS) is None
    exact = ", ".join(["10.0.0.9"] * MAX_FORWARDED_HOPS)
    assert client_from_forwarded_for([exact], DEFAULTS) == "10.0.0.9"
    hidden = "203.0.113.9, " + exact  # the client sits beyond the bound: unknown, not guessed
    assert client_from_forwarded_for([hidden], DEFAULTS) is None


@given(st.lists(st.text(max_size=40), max_size=6))
def test_any_header_gives_an_address_or_none(values: list[str]) -> None:
    found = client_from_forwarded_for(values, DEFAULTS)
    assert found is None or parse_ip(found) is not None


@given(st.lists(st.ip_addresses(v=4).map(str), min_size=1, max_size=5), st.ip_addresses(v=4))
def test_whatever_the_client_prepends_the_proxy_appended_address_wins(
    forged: list[str], real: ipaddress.IPv4Address
) -> None:
    if str(real) in NGINX:
        return
    header = ", ".join([*forged, str(real)])
    assert resolve("192.0.2.10", NGINX, forwarded_for=[header]).address == str(real)


# --- PROXY protocol ---------------------------------------------------------------------------


def v2(command: int, family: int, addresses: bytes, tlvs: bytes = b"") -> bytes:
    body = addresses + tlvs
    return (
        PROXY_V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body
    )


def v2_tcp4(source: str, destination: str = "10.0.0.2", tlvs: bytes = b"") -> bytes:
    packed = ipaddress.IPv4Address(source).packed + ipaddress.IPv4Address(destination).packed
    return v2(1, 0x11, packed + struct.pack("!HH", 51000, 8080), tlvs)


def v2_tcp6(source: str) -> bytes:
    packed = ipaddress.IPv6Address(source).packed + ipaddress.IPv6Address("2001:db8::2").packed
    return v2(1, 0x21, packed + struct.pack("!HH", 51000, 8080))


GET = b"GET /wspublic HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(
    ("header", "source"),
    [
        (b"PROXY TCP4 203.0.113.9 10.0.0.2 51000 8080\r\n", "203.0.113.9"),
        (b"PROXY TCP6 2001:db8::9 2001:db8::2 51000 8080\r\n", "2001:db8::9"),
        (b"PROXY TCP6 ::ffff:203.0.113.9 ::ffff:10.0.0.2 1 2\r\n", "203.0.113.9"),
        (b"PROXY UNKNOWN\r\n", None),
        (b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n", None),
        (v2_tcp4("203.0.113.9"), "203.0.113.9"),
        (v2_tcp4("203.0.113.9", tlvs=b"\x04\x00\x03abc"), "203.0.113.9"),  # a TLV is skipped
        (v2_tcp6("2001:db8::9"), "2001:db8::9"),
        (v2_tcp6("::ffff:203.0.113.9"), "203.0.113.9"),
        (v2(0, 0x00, b""), None),  # LOCAL: a health check of the load balancer
        (v2(1, 0x31, b"\x00" * 216), None),  # AF_UNIX
        (v2(1, 0x00, b""), None),  # UNSPEC
    ],
)
def test_headers_are_parsed_and_only_their_bytes_consumed(
    header: bytes, source: str | None
) -> None:
    parsed = parse_proxy_header(header + GET)
    assert parsed == ProxyHeader(len(header), source, 1 if header.startswith(b"PROXY") else 2)
    # fed byte by byte, every strict prefix asks for more
    for end in range(len(header)):
        assert parse_proxy_header(header[:end]) is None, end


@pytest.mark.parametrize(
    "data",
    [
        GET,
        b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
        b"PROXY TCP4 1.2.3.4:80 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 2001:db8::1 5.6.7.8 1 2\r\n",
        b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
        b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\xff\r\n",
        b"PROXY " + b"A" * 200,  # no CRLF within 107 bytes
        PROXY_V2_SIGNATURE + b"\x11\x11\x00\x0c" + b"\x00" * 12,  # version 1 in a v2 header
        PROXY_V2_SIGNATURE + b"\x22\x11\x00\x0c" + b"\x00" * 12,  # command 2
        PROXY_V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\x00" * 4,  # IPv4 addresses truncated
        PROXY_V2_SIGNATURE + b"\x21\x21\x00\x0c" + b"\x00" * 12,  # IPv6 addresses truncated
        PROXY_V2_SIGNATURE + b"\x21\x51\x00\x00",  # unknown family
        b"\r\n\r\n\x00\r\nQUITX",
    ],
)
def test_malformed_headers_are_refused(data: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse_proxy_header(data)


def test_a_v2_header_longer_than_the_bound_is_refused_before_it_is_read() -> None:
    fixed = PROXY_V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", MAX_PROXY_HEADER_BYTES - 15)
    with pytest.raises(ProxyProtocolError, match="too long"):
        parse_proxy_header(fixed)  # the length field alone decides: nothing more is awaited
    just_fits = v2_tcp4("203.0.113.9", tlvs=b"\x04" + b"x" * (MAX_PROXY_HEADER_BYTES - 29))
    assert len(just_fits) == MAX_PROXY_HEADER_BYTES
    parsed = parse_proxy_header(just_fits)
    assert parsed is not None and parsed.length == MAX_PROXY_HEADER_BYTES


def test_a_proxy_header_source_replaces_the_peer_for_trusted_peers_only() -> None:
    balancer = TrustedProxies.parse("10.0.0.0/8")
    client = resolve("10.0.0.1", balancer, proxy_source="203.0.113.9")
    assert client == ClientAddress("203.0.113.9", "10.0.0.1", True, "203.0.113.9")
    # An internal proxy behind the balancer then names the client in X-Forwarded-For.
    chained = resolve(
        "10.0.0.1", balancer, proxy_source="10.0.0.50", forwarded_for=["198.51.100.4"]
    )
    assert chained.limit_key == "198.51.100.4"
    # A health check (no source) is the balancer's own connection: exempt.
    assert resolve("10.0.0.1", balancer, proxy_source=None).limit_key is None


@given(st.binary(max_size=300))
def test_any_bytes_give_a_header_more_please_or_the_one_error(data: bytes) -> None:
    try:
        parsed = parse_proxy_header(data)
    except ProxyProtocolError:
        return
    assert parsed is None or 0 < parsed.length <= len(data)


@given(st.ip_addresses(v=4), st.ip_addresses(v=6), st.booleans())
def test_v1_and_v2_agree(v4: ipaddress.IPv4Address, v6: ipaddress.IPv6Address, six: bool) -> None:
    source = v6 if six else v4
    family = "TCP6" if six else "TCP4"
    other = "2001:db8::2" if six else "10.0.0.2"
    line = f"PROXY {family} {source} {other} 1 2\r\n".encode()
    binary = v2_tcp6(str(source)) if six else v2_tcp4(str(source))
    first, second = parse_proxy_header(line), parse_proxy_header(binary)
    assert first is not None and second is not None
    assert first.source == second.source


@pytest.mark.parametrize(
    "data", [GET, b"POST / HTTP/1.1\r\n", b"PRI * HTTP/2.0\r\n", b"\x16\x03\x01", b"proxy TCP4"]
)
def test_a_connection_without_a_header_is_told_from_a_broken_header(data: bytes) -> None:
    # The transport answers proxy_header_missing for these, proxy_header_invalid for the rest.
    with pytest.raises(ProxyHeaderMissing):
        parse_proxy_header(data)
    assert not starts_with_proxy_header(data)


@pytest.mark.parametrize(
    "data",
    [
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
        b"PROXY " + b"A" * 200,
        PROXY_V2_SIGNATURE + b"\x22\x11\x00\x0c" + b"\x00" * 12,
    ],
)
def test_a_broken_header_is_not_a_missing_one(data: bytes) -> None:
    with pytest.raises(ProxyProtocolError) as caught:
        parse_proxy_header(data)
    assert not isinstance(caught.value, ProxyHeaderMissing)
    assert starts_with_proxy_header(data)


def test_only_a_whole_signature_counts_as_a_header_where_none_is_expected() -> None:
    assert starts_with_proxy_header(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n")
    assert starts_with_proxy_header(PROXY_V2_SIGNATURE + b"\x21")
    for prefix in (b"PROXY", b"PROX", PROXY_V2_SIGNATURE[:11], b""):
        assert not starts_with_proxy_header(prefix)  # too short to tell: picows decides
