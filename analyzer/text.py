"""Text from a capture, made safe to show.

Whatever a server or client put in a URL, a header or a body reaches the user's terminal,
logs and reports through these functions. A control character is shown as its escape
(`\\x1b`), so that an upstream's `Location` with `ESC ] 0 ; ... BEL` cannot retitle or
clear the tester's terminal; characters that XML 1.0 cannot hold are escaped the same
way in XML.
"""

from __future__ import annotations

import re

# C0 controls, DEL, C1 controls (U+0080-U+009F: CSI and others in 8-bit terminals), and
# lone surrogates, which no encoder writes.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# What XML 1.0 cannot contain at all, even as a character reference.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match[0])
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object) -> str:
    """`text` with every control character (tabs and newlines too) written as its escape."""
    value = str(text)
    if value.isprintable():
        return value
    return _UNSAFE.sub(_escape, value)


def xml_safe(text: object) -> str:
    """`text` with the characters XML 1.0 cannot hold written as escapes."""
    return _NOT_XML.sub(_escape, str(text))


_C1 = {code: f"\\u{code:04x}" for code in range(0x7F, 0xA0)}


def json_terminal_safe(text: str) -> str:
    """JSON text (from json.dumps, which escapes C0 controls) with DEL and the C1 controls
    escaped too: they are valid JSON either way, and raw they can steer a terminal."""
    return text.translate(_C1)


def counted(n: int, singular: str, plural: str | None = None) -> str:
    """`1 hop`, `2 hops`: a count with the noun in the right number."""
    return f"{n:,} {singular if n == 1 else plural or singular + 's'}"
