"""The contract's words for its string formats, in place of the regular expressions behind them.

msgspec reports a string that breaks a pattern as ``Expected `str` matching regex
'^[0-9]{4}-...Z$(?!\\n)'``: true, but written for the validator, not for the developer whose
request was refused. `PATTERN_WORDS` says what each pattern of the contract means, as the
contract says it ("an RFC 3339 UTC timestamp such as 2026-11-23T19:45:00Z"). It is keyed by the
pattern itself, read from the types of `core.messages`, so a pattern changed there without new
words here is caught by a test, not silently shown raw.

Used by `core.codec` (error messages of the WebSocket protocol and the HTTP API) and by
``/docs`` (the constraints column of field tables).
"""

from __future__ import annotations

from typing import Any

from igratech_ws.core import messages


def pattern_of(annotated: Any) -> str:
    """The regular expression of a string type of `core.messages` (``Annotated[str, Meta]``)."""
    for meta in getattr(annotated, "__metadata__", ()):
        pattern = getattr(meta, "pattern", None)
        if pattern:
            return str(pattern)
    raise ValueError(f"{annotated!r} has no pattern")


#: Pattern -> what a matching string is, in the contract's words (a noun phrase).
PATTERN_WORDS: dict[str, str] = {
    pattern_of(messages.Identifier): (
        "an identifier of 1-64 characters among A-Z a-z 0-9 _ . - starting with a letter or digit"
    ),
    pattern_of(messages.Money): 'a decimal amount written as a string, such as "125.50"',
    pattern_of(messages.Odds): 'decimal odds of at least 1 written as a string, such as "2.10"',
    pattern_of(messages.Currency): (
        'a currency code of 3-8 capital letters or digits starting with a letter, such as "EUR"'
    ),
    pattern_of(messages.Timestamp): "an RFC 3339 UTC timestamp such as 2026-11-23T19:45:00Z",
    pattern_of(messages.Keyword): "a lowercase snake_case word such as goal",
    # Channel names of server frames in the AsyncAPI document (frames are not decoded here).
    r"^game:[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$(?!\n)": "game:<gameId>",
    r"^user:[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$(?!\n)": "user:<userId>",
    r"^(global|game:[A-Za-z0-9][A-Za-z0-9_.\-]{0,63})$(?!\n)": "global, or game:<gameId>",
    # The handshake's Authorization header in the AsyncAPI document.
    r"^Bearer [A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*$(?!\n)": (
        "the word Bearer, a space and a JWT"
    ),
}

_PREFIX = "Expected `str` matching regex "


def pattern_words(pattern: str) -> str | None:
    """The contract's words for `pattern`, or None for a pattern it does not name."""
    return PATTERN_WORDS.get(pattern)


def in_contract_words(message: str) -> str:
    """`message` (a msgspec validation message) with a pattern mismatch said in words:
    ``Expected `str` matching regex '...'`` becomes ``Expected an RFC 3339 UTC timestamp such as
    2026-11-23T19:45:00Z``. Other messages are returned unchanged."""
    if _PREFIX not in message:
        return message
    for pattern, words in PATTERN_WORDS.items():
        quoted = _PREFIX + repr(pattern)
        if quoted in message:
            return message.replace(quoted, "Expected " + words)
    return message
