"""The client's address behind trusted reverse proxies, sans-IO: peer and headers in, address out.

A reverse proxy (nginx, HAProxy) connects from its own address; it says whom it serves by
appending that client's address to `X-Forwarded-For` (or a `for=` element to RFC 7239
`Forwarded`). Only proxies the operator lists are believed, and only the one header the
operator names is read: a proxy that appends to `X-Forwarded-For` but passes a client's own
`Forwarded` through would otherwise let the client choose its address.

Guarantees of `TrustedProxies.client_address` (tests/test_proxies.py):
- it never raises, and returns either the peer, unchanged, or a canonical IP address (IPv4-mapped
  IPv6 written as IPv4) that one of the header's hops names;
- a peer that is not trusted is the answer, whatever its headers say;
- from a trusted peer, the hops are walked from the right, trusted ones skipped, and the first
  untrusted one is the answer; if every hop is trusted, the leftmost walked;
- a hop that is not an address (garbage, `unknown`, an obfuscated `_name`, a scope `%eth0`) stops
  the walk at the nearest trusted address (the proxy that wrote it): garbage never picks an
  address, and the answer is always one a trusted party vouched for;
- at most `MAX_HOPS` list elements are walked (empty ones, which RFC 9110 §5.6.1 says to ignore,
  included), each line read from its end, so the work is bounded by the hops walked and the
  request head (upgrade.MAX_REQUEST_HEAD), and nothing a client writes before a proxy's element
  changes how that element is read.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Literal

MAX_HOPS = 32  # list elements walked from the right; a longer chain of proxies is not real

ForwardedHeader = Literal["x-forwarded-for", "forwarded"]
Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network

# One list element of a Forwarded field line *reversed*, up to its comma (group 2: "," or ""
# at the end of the line; anything else makes the element and the rest of the line malformed).
# Reading from the right costs only the elements walked, however long the line, and the element
# a proxy appends is read first whatever a client wrote before it (an unterminated quote
# included). Quoted strings may hold commas and semicolons but no backslash: a quoted-pair is
# never needed by an address, so it makes the element malformed rather than reversing ambiguously.
# Possessive runs: each element costs one linear scan, and the match never backtracks.
_ELEMENT_REVERSED = re.compile(r'((?:[^",\\]++|"[^"\\]*+")*+)(,|\Z|.+)', re.S)
_PAIR = re.compile(r'((?:[^";]++|"[^"]*+")*+)(;|\Z)', re.S)  # within an element, as above
MAX_PARAMETERS = 16  # pairs read in one Forwarded element (RFC 7239 defines four), empty ones too
_PORT = re.compile(r"[0-9]{1,5}|_[A-Za-z0-9._-]+")  # RFC 7239 §6: node-port or obfport
_MAPPED = IPv6Network("::ffff:0:0/96")


def parse_network(text: str) -> Network:
    """A CIDR (`10.0.0.0/8`, `2001:db8::/32`) or a single address (`192.0.2.1`, `::1`).

    Raises ValueError with a message for the operator: host bits set (`10.0.0.1/8`), a zone
    (`fe80::1%eth0`) or anything that is not an address. IPv4-mapped IPv6 networks are stored as
    IPv4, so `::ffff:10.0.0.0/104` and `10.0.0.0/8` mean the same.
    """
    text = text.strip()
    if "%" in text:
        raise ValueError(f"an address with a zone (%) cannot be trusted: {text!r}")
    try:
        network = ip_network(text, strict=True)
    except ValueError:
        try:
            loose = ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"not an IP address or CIDR: {text!r}") from None
        raise ValueError(f"{text!r} has host bits set; did you mean {str(loose)!r}?") from None
    if isinstance(network, IPv6Network) and network.subnet_of(_MAPPED):
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        return IPv4Network((mapped, network.prefixlen - 96))
    return network


def parse_node(text: str) -> Address | None:
    """The address of one hop, or None when it names none.

    Accepts what proxies write: `192.0.2.1`, `2001:db8::1`, `192.0.2.1:4711`,
    `[2001:db8::1]` and `[2001:db8::1]:443` (RFC 7239 §6, the port a number or `_obfport`).
    None for `unknown`, obfuscated `_names`, zones, bracketed IPv4, anything else. IPv4-mapped
    IPv6 comes back as IPv4.
    """
    text = text.strip(" \t")
    if "%" in text:  # a zone index means nothing beyond the proxy's own link
        return None
    if text.startswith("["):
        host, bracket, port = text[1:].partition("]")
        if not bracket or (port and not (port[0] == ":" and _PORT.fullmatch(port[1:]))):
            return None
        return _unmapped(_address(host, v6_only=True))
    if text.count(":") == 1:  # IPv4 with a port; IPv6 has at least two colons
        host, _, port = text.partition(":")
        if not _PORT.fullmatch(port):
            return None
        address = _address(host)
        return address if isinstance(address, IPv4Address) else None
    return _unmapped(_address(text))


def x_forwarded_for_hops(values: Iterable[bytes]) -> Iterator[str]:
    """The elements of `X-Forwarded-For` field lines, right to left, at most MAX_HOPS of them.

    `values` are the lines in the order received (repeated lines are one comma-separated list,
    RFC 9110 §5.3). Empty elements come out as "", to be skipped."""
    budget = MAX_HOPS
    for value in reversed(list(values)):
        elements = value.decode("latin-1").rsplit(",", budget)
        if len(elements) > budget:
            del elements[0]  # the unsplit rest, beyond the walk
        for element in reversed(elements):
            yield element.strip(" \t")
            budget -= 1
            if budget == 0:
                return


def forwarded_for_hops(values: Iterable[bytes]) -> Iterator[str | None]:
    """The `for=` node of each RFC 7239 `Forwarded` element, right to left, at most MAX_HOPS.

    Each field line is read on its own, from its end (see _ELEMENT_REVERSED). None for an
    element that is malformed, has no `for=`, has several or has over MAX_PARAMETERS pairs
    (the walk stops there); "" for an empty element, to be skipped."""
    budget = MAX_HOPS
    for value in reversed(list(values)):
        line, pos = value.decode("latin-1")[::-1], 0
        while True:
            match = _ELEMENT_REVERSED.match(line, pos)
            assert match is not None  # the pattern matches at any position
            element, end = match.groups()
            yield _for_parameter(element[::-1]) if end in (",", "") else None
            budget -= 1
            if budget == 0:
                return
            if end != ",":
                break
            pos = match.end()


@dataclass(frozen=True, slots=True)
class TrustedProxies:
    """The proxies whose forwarding header is believed, and which header that is.

    The default trusts no one: the client is the socket's peer."""

    networks: tuple[Network, ...] = ()
    header: ForwardedHeader = "x-forwarded-for"

    @classmethod
    def parse(
        cls, entries: Iterable[str], header: ForwardedHeader = "x-forwarded-for"
    ) -> TrustedProxies:
        """From config strings (see `parse_network`); raises ValueError naming a bad entry."""
        return cls(tuple(parse_network(entry) for entry in entries), header)

    def trusts(self, address: Address) -> bool:
        return any(address in network for network in self.networks)

    def client_address(self, peer: str, headers: Iterable[tuple[bytes, bytes]]) -> str:
        """The client's address for limits and logs: `peer` (the socket's, as the server writes
        it) or a forwarded one; see the module's guarantees. `headers` have lower-case names."""
        if not self.networks:
            return peer
        peer_address = _unmapped(_address(peer.partition("%")[0]))  # a link-local peer's zone
        if peer_address is None or not self.trusts(peer_address):
            return peer
        name = self.header.encode()
        values = [value for key, value in headers if key == name]
        if self.header == "forwarded":
            hops = forwarded_for_hops(values)
        else:
            hops = x_forwarded_for_hops(values)
        nearest = peer  # the last trusted address on the walk: who wrote the next hop
        for hop in hops:
            if hop == "":
                continue
            address = None if hop is None else parse_node(hop)
            if address is None:
                return nearest
            if not self.trusts(address):
                return str(address)
            nearest = str(address)
        return nearest


def _for_parameter(element: str) -> str | None:
    """The unquoted value of the element's only `for` parameter; "" for an empty element."""
    if not element.strip(" \t"):
        return ""
    found, pos = None, 0
    for _ in range(MAX_PARAMETERS):
        match = _PAIR.match(element, pos)
        assert match is not None  # the element's quotes are balanced: every pair ends
        pair, end = match.groups()
        pos = match.end()
        if pair.strip(" \t"):  # `a=1;;b=2` holds an empty pair
            name, equals, value = pair.partition("=")
            if not equals:
                return None
            if name.strip(" \t").lower() == "for":
                if found is not None:  # RFC 7239 §4: at most once per element
                    return None
                found = _unquoted(value.strip(" \t"))
                if found is None:
                    return None
        if not end:
            return found
    return None  # more pairs than any proxy writes


def _unquoted(value: str) -> str | None:
    """A token as is, a quoted string without its quotes; None for a broken quoted string."""
    if not value.startswith('"'):
        return value
    if len(value) < 2 or not value.endswith('"') or '"' in value[1:-1]:
        return None
    return value[1:-1]


def _address(text: str, *, v6_only: bool = False) -> Address | None:
    """The address `text` is, or None. Callers have refused zones (`%`) already."""
    try:
        return IPv6Address(text) if v6_only else ip_address(text)
    except ValueError:
        return None


def _unmapped(address: Address | None) -> Address | None:
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
