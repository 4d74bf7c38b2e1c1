"""Replacing one field of a ``multipart/form-data`` body, byte for byte elsewhere.

No I/O. Only the named field's value changes; every other part (the audio
file above all) is copied through untouched, so no decoding of it can go
wrong.
"""

from __future__ import annotations

import re

__all__ = ["MultipartError", "replace_form_field"]

_BOUNDARY = re.compile(r'boundary=(?:"([^"]{1,70})"|([^\s;"]{1,70}))', re.IGNORECASE)
_NAME = re.compile(rb'\bname="([^"]*)"', re.IGNORECASE)


class MultipartError(ValueError):
    """The body is not well-formed multipart/form-data; the message says why."""


def boundary_of(content_type: str) -> bytes:
    """The boundary parameter of a ``multipart/form-data`` content type."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise MultipartError("expected content-type multipart/form-data")
    match = _BOUNDARY.search(content_type)
    if match is None:
        raise MultipartError("multipart/form-data without a boundary")
    return (match[1] or match[2]).encode("latin-1")


def replace_form_field(
    body: bytes, content_type: str, name: str, new_value: str | None = None
) -> tuple[str | None, bytes]:
    """Return the field's current value and the body with it set to ``new_value``.

    With ``new_value`` None the body is returned unchanged. The value is None
    when there is no such field. Raises :class:`MultipartError` on a body
    that does not follow its own boundary.
    """
    delimiter = b"--" + boundary_of(content_type)
    first = body.find(delimiter)
    if first < 0:
        raise MultipartError("multipart body does not contain its boundary")
    pos = first + len(delimiter)
    wanted = name.encode()
    while not body.startswith(b"--", pos):  # "--" after a delimiter ends the body
        if not body.startswith(b"\r\n", pos):
            raise MultipartError("malformed multipart delimiter line")
        head_end = body.find(b"\r\n\r\n", pos + 2)
        if head_end < 0:
            raise MultipartError("multipart part without a blank line after its headers")
        value_start = head_end + 4
        value_end = body.find(b"\r\n" + delimiter, value_start)
        if value_end < 0:
            raise MultipartError("multipart part is not closed by the boundary")
        headers = body[pos + 2 : head_end]
        match = _NAME.search(headers)
        if match is not None and match[1] == wanted:
            current = body[value_start:value_end].decode("utf-8", "replace")
            if new_value is None:
                return current, body
            return current, body[:value_start] + new_value.encode() + body[value_end:]
        pos = value_end + 2 + len(delimiter)
    return None, body
