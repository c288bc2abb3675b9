"""The listener's own reading of the upgrade request, held to picows's (which it replaced to save
a third of a handshake's CPU) and to the standard library's query parsing (which the fast path
skips): the same requests accepted with the same fields, the same ones refused."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

from hypothesis import given, settings
from hypothesis import strategies as st
from picows import picows

from igratech_ws.transport.websocket import MAX_QUERY_FIELDS, PATH, plain_query
from igratech_ws.transport.wsconnection import BadRequest, accept_key, parse_request

# picows's own request reading (Cython functions its stubs do not declare).
_parse_http_request: Any = getattr(picows, "_parse_http_request")  # noqa: B009
_validate_upgrade_request: Any = getattr(picows, "_validate_upgrade_request")  # noqa: B009

GOOD = (
    b"GET /wspublic?token=a.b.c HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13"
)
# Pieces an attacker or a broken client puts in a request.
PIECES = [
    b"GET",
    b"POST",
    b"get",
    b" ",
    b"  ",
    b"\t",
    b"/wspublic",
    b"",
    b"HTTP/1.1",
    b"HTTP/1.0",
    b"\r\n",
    b"\n",
    b"\r",
    b":",
    b"Host",
    b"Upgrade",
    b"upgrade",
    b"websocket",
    b"WebSocket",
    b"Connection",
    b"keep-alive, Upgrade",
    b"Sec-WebSocket-Key",
    b"Sec-WebSocket-Version",
    b"13",
    b"8",
    b"dGhlIHNhbXBsZSBub25jZQ==",
    b"dGhlIHNhbXBsZSBub25jZQ",
    b"Transfer-Encoding",
    b"Content-Length",
    b"0",
    b"00",
    b"5",
    b"X Bad",
    b"\x00",
    b"\x7f",
    b"\xff",
    b"\xc3\xa9",
    b"(",
    b"@",
]


def picows_reading(head: bytes) -> tuple[str, object]:
    try:
        request = _parse_http_request(head)
    except RuntimeError:
        return ("refused", None)
    fields = (request.method, request.path, request.version, list(request.headers.items()))
    try:
        accept = _validate_upgrade_request(request)
    except RuntimeError:
        return ("not an upgrade", fields)
    return ("upgrade", (fields, accept))


def our_reading(head: bytes) -> tuple[str, object]:
    try:
        request = parse_request(head)
    except BadRequest:
        return ("refused", None)
    fields = (request.method, request.path, request.version, list(request.headers.items()))
    try:
        accept = accept_key(request.headers)
    except BadRequest:
        return ("not an upgrade", fields)
    return ("upgrade", (fields, accept))


def test_a_good_request_reads_as_picows_reads_it() -> None:
    assert our_reading(GOOD) == picows_reading(GOOD)
    assert our_reading(GOOD)[0] == "upgrade"
    # RFC 6455 section 1.3's example key and answer.
    assert parse_request(GOOD).headers["Sec-WebSocket-Key"] == "dGhlIHNhbXBsZSBub25jZQ=="
    assert accept_key(parse_request(GOOD).headers) == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=24), st.integers(0, 400))
def test_a_mangled_request_is_refused_or_read_exactly_as_picows_does(
    pieces: list[bytes], at: int
) -> None:
    # A good request with junk spliced in somewhere, and junk alone.
    spliced = GOOD[:at] + b"".join(pieces) + GOOD[at:]
    for head in (spliced, b"".join(pieces)):
        assert our_reading(head) == picows_reading(head), head


def test_too_many_header_fields_are_refused_like_picows() -> None:
    for count in (127, 128, 129):
        head = GOOD + b"".join(b"\r\nX-%d: 1" % i for i in range(count - 5))
        assert our_reading(head) == picows_reading(head), count


QUERY_CHARS = st.sampled_from([*"ab=&%+#?;:/@[]. \t-_~0123456789AF", "%zz", "%ff", "%41"])


@settings(max_examples=1500, deadline=None)
@given(st.lists(QUERY_CHARS, max_size=40), st.sampled_from(["/wspublic?", "/wspublic", "/x?"]))
def test_the_fast_query_path_reads_what_parse_qs_reads(chars: list[str], prefix: str) -> None:
    target = prefix + "".join(chars)
    fast = plain_query(target.encode())
    if fast is None:
        return  # the full parse decides (and refuses what it refuses)
    split = urlsplit(target)
    assert split.path == PATH
    assert fast == parse_qs(split.query, max_num_fields=MAX_QUERY_FIELDS, errors="strict")


def test_the_fast_path_takes_the_usual_handshake() -> None:
    target = b"/wspublic?token=eyJh.eyJz.c2ln-_&settings=%7B%7D"
    assert plain_query(target) is None  # percent-escapes: the full parse
    assert plain_query(b"/wspublic?token=eyJh.eyJz.c2ln-_") == {"token": ["eyJh.eyJz.c2ln-_"]}
    assert plain_query(b"/wspublic") == {}
    assert plain_query(b"/wspublic?" + b"&".join(b"a=1" for _ in range(17))) is None
