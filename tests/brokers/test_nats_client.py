"""`brokers.nats.client`: the faster header parser reads every block as nats-py's own does."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client as NatsPyClient

from igratech_ws.brokers.nats.client import Client, parse_header_lines

# Bytes that matter to a header parser: separators, whitespace of every kind, non-ASCII.
_PIECES = [b"\r\n", b":", b": ", b" ", b"\t", b"\x0b", b"\x1c", b"\x1f", b"\xc3\xa9", b"\xff",
           b"Igws-Offset", b"Nats-Sequence", b"12", b"a", b"-", b""]
blocks = st.lists(st.sampled_from(_PIECES) | st.binary(max_size=6), max_size=30).map(b"".join)


@given(blocks)
def test_parses_any_block_as_nats_py_does(raw: bytes) -> None:
    assert parse_header_lines(raw) == NatsPyClient._parse_header_lines(raw)


def test_a_republished_publication() -> None:
    raw = (
        b"Igws-Offset: 7\r\nIgws-Epoch: ab12\r\nIgws-Event: incident\r\nIgws-Time: 1.5\r\n"
        b"Igws-Origin: n1\r\nNats-Stream: IGWS_x\r\nNats-Subject: x.ch.game:g-1\r\n"
        b"Nats-Sequence: 42\r\nNats-Last-Sequence: 41\r\n\r\n"
    )
    parsed = parse_header_lines(raw)
    assert parsed == NatsPyClient._parse_header_lines(raw)
    assert parsed["Igws-Offset"] == "7" and parsed["Nats-Last-Sequence"] == "41"


def test_the_broker_client_uses_it() -> None:
    assert Client._parse_header_lines is parse_header_lines
