"""The real client address behind trusted proxies: X-Forwarded-For, the PROXY protocol, trust.

Pure (no I/O). The transport (transport/wsconnection.py) calls it once per connection, before
the node counts the connection, so that the per-address limit and the logs see the client, not
the load balancer:

1. ``TrustedProxies.parse(config.trusted_proxies)`` once at start (addresses and CIDRs).
2. When ``config.proxy_protocol`` is on and the TCP peer is trusted, the connection must start
   with a PROXY protocol header (v1 text or v2 binary, HAProxy's spec): feed the first bytes to
   `parse_proxy_header` until it returns a `ProxyHeader`, strip ``header.length`` bytes, and
   pass ``header.source`` on. Untrusted peers never get their bytes read as a PROXY header (a
   client could claim any address).
3. `resolve(peer, trusted, forwarded_for=..., proxy_source=...)` gives the `ClientAddress`:
   ``address`` to log and meter, and ``limit_key`` for the per-address connection limit.

X-Forwarded-For is read right to left and the right-most address that is not a trusted proxy
is the client (every proxy appends the address it got the request from, so entries left of the
first untrusted one may be forged by the client). With the default trust list (loopback and
private ranges, as Rails does), a gateway behind nginx, a Kubernetes ingress or a cloud load
balancer in a private network counts real clients; a trusted peer that names no client (no
header, or only unusable entries) is a proxy whose clients cannot be told apart, so the
per-address limit does not apply to it (`ClientAddress.limit_key` is None): the node's
connection cap still does.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The default `trusted_proxies`: loopback and private networks (RFC 1918, RFC 4193 unique local,
#: and the link-local ranges), the networks a reverse proxy or load balancer reaches a node from.
DEFAULT_TRUSTED_PROXIES = (
    "127.0.0.0/8,::1/128,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7,169.254.0.0/16,fe80::/10"
)
#: At most this many X-Forwarded-For entries are read (from the right); a longer chain of
#: trusted proxies than this is not a deployment, and the bound keeps the work per handshake small.
MAX_FORWARDED_HOPS = 16
#: Longest PROXY header accepted. v1 lines are at most 107 bytes (the spec); v2 headers carry
#: TLVs (TLS details, cloud endpoint ids) that stay well below this. A longer one is refused,
#: which bounds what a connection may make the node buffer before its handshake.
MAX_PROXY_HEADER_BYTES = 4096
#: The 12-byte signature that starts a PROXY protocol v2 header.
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_PREFIX = b"PROXY "
_V1_MAX = 107


class ProxyProtocolError(ValueError):
    """The bytes at the start of a connection are not a valid PROXY protocol header: close it."""


class ProxyHeaderMissing(ProxyProtocolError):
    """The connection starts with something else than a PROXY protocol header (an HTTP request
    from a proxy that was not told to send one, or a client reaching the node directly)."""


def parse_ip(text: str) -> IPAddress | None:
    """`text` as an IP address, or None. Accepts what proxies write in X-Forwarded-For:
    ``1.2.3.4``, ``1.2.3.4:5678``, ``2001:db8::1``, ``[2001:db8::1]:443``, ``fe80::1%eth0``.
    IPv4-mapped IPv6 addresses (``::ffff:1.2.3.4``, from dual-stack sockets) become IPv4."""
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:  # IPv4 with a port
        text = text.partition(":")[0]
    text = text.partition("%")[0]
    if not text or len(text) > 45:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True, slots=True)
class TrustedProxies:
    """The networks whose connections may tell the client's address (proxies, load balancers)."""

    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, text: str) -> TrustedProxies:
        """Comma-separated addresses and CIDRs (``10.0.0.0/8, 192.0.2.7, ::1``); empty trusts
        nobody. Raises `ValueError` naming the first bad entry and why."""
        networks: list[IPNetwork] = []
        for entry in (part.strip() for part in text.split(",")):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=True))
            except ValueError as exc:
                reason = "has host bits set" if "host bits" in str(exc) else "is not an address"
                raise ValueError(
                    f"{entry!r} {reason}: write an address (192.0.2.7) or a network (10.0.0.0/8)"
                ) from None
        return cls(tuple(networks))

    def __contains__(self, address: object) -> bool:
        if isinstance(address, str):
            address = parse_ip(address)
        if not isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return False
        return any(address in network for network in self.networks)


@dataclass(frozen=True, slots=True)
class ClientAddress:
    """Who a connection is from.

    `address` is what logs show: the client when a trusted proxy named it, else the
    TCP peer. `limit_key` is what the per-address connection limit counts, or None when the
    connection is exempt from it (it comes from a trusted proxy that did not name the client).
    """

    address: str
    peer: str
    forwarded: bool = False
    limit_key: str | None = None


def client_from_forwarded_for(values: list[str], trusted: TrustedProxies) -> str | None:
    """The client named by X-Forwarded-For header `values` (in the order received), for a
    connection whose peer is trusted: the right-most entry that is not a trusted proxy, or the
    left-most entry when every one is trusted. None when the header names nobody usable (empty,
    or an unparseable entry is reached before an untrusted one: what lies left of it may be
    forged)."""
    entries = [entry for value in values for entry in value.split(",")]
    last_trusted: IPAddress | None = None
    for entry in reversed(entries[-MAX_FORWARDED_HOPS:]):
        address = parse_ip(entry)
        if address is None:
            return None
        if address not in trusted:
            return str(address)
        last_trusted = address
    if len(entries) > MAX_FORWARDED_HOPS:
        return None  # the chain goes on past what was read: its client is unknown
    return str(last_trusted) if last_trusted is not None else None


def resolve(
    peer: str,
    trusted: TrustedProxies,
    *,
    forwarded_for: list[str] | None = None,
    proxy_source: str | None = None,
) -> ClientAddress:
    """The `ClientAddress` of a connection from TCP `peer`.

    `proxy_source` is the source address of the connection's PROXY header (only pass one read
    from a trusted peer); `forwarded_for` the X-Forwarded-For header values of the handshake.
    Headers from an untrusted peer are ignored.
    """
    peer_address = parse_ip(peer)
    peer_text = str(peer_address) if peer_address is not None else peer
    if peer_address is None or peer_address not in trusted:
        return ClientAddress(peer_text, peer_text, limit_key=peer_text)
    nearest = peer_address
    if proxy_source is not None:
        source = parse_ip(proxy_source)
        if source is not None:
            nearest = source
            if source not in trusted:
                return ClientAddress(str(source), peer_text, forwarded=True, limit_key=str(source))
    if forwarded_for:
        client = client_from_forwarded_for(forwarded_for, trusted)
        if client is not None:
            return ClientAddress(client, peer_text, forwarded=True, limit_key=client)
    # A trusted proxy that names no client: many clients share its address, so it is exempt.
    return ClientAddress(str(nearest), peer_text, forwarded=nearest != peer_address)


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed PROXY protocol header: the first `length` bytes of the connection.

    `source` is the original client's address, or None for a header that names none (v1
    ``UNKNOWN``, v2 ``LOCAL`` such as a load balancer's health check, or a non-IP family): the
    connection is then the proxy's own.
    """

    length: int
    source: str | None
    version: int


def parse_proxy_header(data: bytes) -> ProxyHeader | None:
    """Parse the PROXY protocol header (v1 or v2) at the start of `data`.

    Returns None while `data` is a valid but incomplete prefix (read more and call again with
    everything read so far); raises `ProxyHeaderMissing` when `data` cannot start a header, and
    `ProxyProtocolError` when it is malformed or passes `MAX_PROXY_HEADER_BYTES`.
    """
    if not data:
        return None
    if PROXY_V2_SIGNATURE.startswith(data[:12]):
        return _parse_v2(data)
    if _V1_PREFIX.startswith(data[:6]):
        return _parse_v1(data)
    raise ProxyHeaderMissing("the connection does not start with a PROXY protocol header")


def starts_with_proxy_header(data: bytes) -> bool:
    """Whether `data`, the first bytes of a connection, begin with a PROXY protocol signature
    (v1 ``PROXY `` or the v2 binary signature). For a listener that does not expect one: such a
    connection is refused with a reason instead of being parsed as a malformed HTTP request."""
    return data.startswith(_V1_PREFIX) or data.startswith(PROXY_V2_SIGNATURE)


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, _V1_MAX)
    if end < 0:
        if len(data) >= _V1_MAX:
            raise ProxyProtocolError("PROXY v1 line longer than 107 bytes")
        return None
    try:
        line = data[:end].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("PROXY v1 line is not ASCII") from None
    parts = line.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyHeader(end + 2, None, 1)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"malformed PROXY v1 line {line[:60]!r}")
    family = ipaddress.IPv4Address if parts[1] == "TCP4" else ipaddress.IPv6Address
    try:
        source: IPAddress = family(parts[2])
        family(parts[3])
    except ValueError:
        raise ProxyProtocolError(f"PROXY v1 addresses are not {parts[1]} addresses") from None
    for port in parts[4:6]:
        if not (port.isdigit() and len(port) <= 5 and int(port) <= 65535):
            raise ProxyProtocolError(f"PROXY v1 port {port[:8]!r} is not a port")
    if isinstance(source, ipaddress.IPv6Address) and source.ipv4_mapped is not None:
        source = source.ipv4_mapped
    return ProxyHeader(end + 2, str(source), 1)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < 16:
        return None  # the signature (so far) matched: wait for the fixed part
    version_command, family, length = data[12], data[13], struct.unpack_from("!H", data, 14)[0]
    if version_command >> 4 != 2 or version_command & 0x0F not in (0, 1):
        raise ProxyProtocolError("PROXY v2 header with an unknown version or command")
    total = 16 + length
    if total > MAX_PROXY_HEADER_BYTES:
        raise ProxyProtocolError(f"PROXY v2 header of {total} bytes is too long")
    if len(data) < total:
        return None
    if version_command & 0x0F == 0:  # LOCAL: the proxy's own connection (health checks)
        return ProxyHeader(total, None, 2)
    address_family = family >> 4
    if address_family == 1:  # AF_INET
        if length < 12:
            raise ProxyProtocolError("PROXY v2 IPv4 addresses are truncated")
        return ProxyHeader(total, str(ipaddress.IPv4Address(data[16:20])), 2)
    if address_family == 2:  # AF_INET6
        if length < 36:
            raise ProxyProtocolError("PROXY v2 IPv6 addresses are truncated")
        address = ipaddress.IPv6Address(data[16:32])
        mapped = address.ipv4_mapped
        return ProxyHeader(total, str(mapped if mapped is not None else address), 2)
    if address_family in (0, 3):  # AF_UNSPEC, AF_UNIX: no IP address to report
        return ProxyHeader(total, None, 2)
    raise ProxyProtocolError("PROXY v2 header with an unknown address family")
