"""containerd's identifier rules (namespaces, container and exec ids).

Ids become runc ids and path components, so anything outside these rules is refused before
it reaches runc or the filesystem.
"""

from __future__ import annotations

import re

from shim import errors

MAX_LENGTH = 76
_PATTERN = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*")


def problem(field: str, value: str) -> str | None:
    """What is wrong with ``value`` as an identifier (naming ``field``), or None."""
    if not value:
        return f"{field}: must not be empty"
    if len(value) > MAX_LENGTH:
        return f"{field}: longer than {MAX_LENGTH} characters"
    if not _PATTERN.fullmatch(value):
        return f"{field}: {value!r} is not a valid identifier"
    return None


def validate(field: str, value: str) -> str:
    """``value``, or InvalidArgument naming ``field``."""
    message = problem(field, value)
    if message is not None:
        raise errors.invalid(message)
    return value
