"""ttrpc, containerd's lightweight RPC protocol, for asyncio.

``codec`` is the sans-IO protocol (frames, messages, per-connection state); ``server`` and
``client`` run it over unix sockets. The package depends on nothing outside the standard
library, so it can be lifted out on its own.
"""

from .client import Client
from .codec import MAX_MESSAGE_SIZE
from .errors import ClosedError, Code, MessageTooLargeError, ProtocolError, TTRPCError
from .server import Context, Handler, PeerCred, Server, require_same_user

__all__ = [
    "MAX_MESSAGE_SIZE",
    "Client",
    "ClosedError",
    "Code",
    "Context",
    "Handler",
    "MessageTooLargeError",
    "PeerCred",
    "ProtocolError",
    "Server",
    "TTRPCError",
    "require_same_user",
]
