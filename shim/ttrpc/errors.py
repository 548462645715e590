"""Status codes and exceptions shared by the codec, the server and the client.

The codes are gRPC's: ttrpc carries a ``google.rpc.Status`` and containerd maps its code
through errdefs exactly as it would a gRPC error, so the numbers must be the standard ones.

Imported by the short-lived subcommands: no ``enum`` (see ``_intenum``), no ``__future__``.
"""

TYPE_CHECKING = False
if TYPE_CHECKING:
    from enum import IntEnum
else:
    from ._intenum import IntEnum

__all__ = [
    "ClosedError",
    "Code",
    "MessageTooLargeError",
    "ProtocolError",
    "TTRPCError",
]


class Code(IntEnum):
    """gRPC status codes (google.rpc.Code)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16

    @classmethod
    def from_wire(cls, value: int) -> "Code":
        """Map a received code; a number outside the table is UNKNOWN rather than a crash."""
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN


class TTRPCError(Exception):
    """An RPC failed with a status: raised by handlers to answer, raised by the client to report.

    ``details`` holds the status's ``google.protobuf.Any`` entries as (type_url, value) pairs,
    kept opaque because this package does not know the message types.
    """

    def __init__(
        self, code: Code, message: str, details: tuple[tuple[str, bytes], ...] = ()
    ) -> None:
        super().__init__(code, message)
        self.code = Code(code)
        self.message = message
        self.details = details

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def __repr__(self) -> str:
        return f"TTRPCError({self.code.name}, {self.message!r})"


class MessageTooLargeError(TTRPCError):
    """A message exceeds the 4 MiB frame limit; the sender refuses rather than break the peer."""

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(
            Code.RESOURCE_EXHAUSTED,
            f"message length {length} exceed maximum message size of {limit}",
        )
        self.length = length
        self.limit = limit


class ProtocolError(ValueError):
    """Bytes that are not a valid ttrpc message; the only exception the codec's decoders raise."""


class ClosedError(ConnectionError):
    """The connection is gone; every call pending on it fails with this."""

    def __init__(self, message: str = "ttrpc: closed") -> None:
        super().__init__(message)
