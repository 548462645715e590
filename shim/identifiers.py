"""containerd's identifier rules (namespaces, container and exec ids).

Ids become runc ids and path components, so anything outside these rules is refused before
it reaches runc or the filesystem.
"""

from __future__ import annotations

import re

from shim import errors

MAX_LENGTH = 76
_PATTERN = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*")


def validate(field: str, value: str) -> str:
    if not value:
        raise errors.invalid(f"{field}: must not be empty")
    if len(value) > MAX_LENGTH:
        raise errors.invalid(f"{field}: longer than {MAX_LENGTH} characters")
    if not _PATTERN.fullmatch(value):
        raise errors.invalid(f"{field}: {value[:MAX_LENGTH]!r} is not a valid identifier")
    return value
