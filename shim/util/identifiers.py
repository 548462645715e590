"""containerd's identifier rules (namespaces, container and exec ids).

Ids become runc ids and path components, so anything outside these rules is refused before
it reaches runc or the filesystem: one or more runs of ``[A-Za-z0-9]`` joined by single
``.``, ``_`` or ``-``, at most 76 characters.

Imported by the short-lived ``start`` and ``delete`` subcommands: no ``re`` (a character
loop does the job), no ``__future__``, and the error type only when one is raised.
"""

MAX_LENGTH = 76
_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_SEPARATORS = frozenset("._-")


def problem(field: str, value: str) -> str | None:
    """What is wrong with ``value`` as an identifier (naming ``field``), or None."""
    if not value:
        return f"{field}: must not be empty"
    if len(value) > MAX_LENGTH:
        return f"{field}: longer than {MAX_LENGTH} characters"
    after_separator = True  # an id starts, and ends, with a letter or digit
    for ch in value:
        if ch in _ALNUM:
            after_separator = False
        elif ch in _SEPARATORS and not after_separator:
            after_separator = True
        else:
            return f"{field}: {value!r} is not a valid identifier"
    if after_separator:
        return f"{field}: {value!r} is not a valid identifier"
    return None


def task_problem(namespace: str, id: str) -> str | None:
    """What is wrong with a task's namespace, else with its id, or None."""
    return problem("namespace", namespace) or problem("id", id)


def validate(field: str, value: str) -> str:
    """``value``, or InvalidArgument naming ``field``."""
    message = problem(field, value)
    if message is not None:
        from shim.util import errors

        raise errors.invalid(message)
    return value
