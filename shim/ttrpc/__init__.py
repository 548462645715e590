"""ttrpc, containerd's lightweight RPC protocol, for asyncio.

``codec`` is the sans-IO protocol (frames, messages, per-connection state); ``server`` and
``client`` run it over unix sockets. The package depends on nothing outside the standard
library, so it can be lifted out on its own.

``handoff`` describes a live server passed to another process (``Server.quiesce``,
``Server.handoff``, ``Server.adopt``), so a daemon can re-exec itself without its peers
noticing.

The asyncio parts are imported on first use, so a short-lived process that only needs the
codec (a blocking client, say) does not pay for importing asyncio; nor does importing the
package import ``typing`` or ``importlib``.
"""

from .codec import MAX_MESSAGE_SIZE
from .errors import ClosedError, Code, MessageTooLargeError, ProtocolError, TTRPCError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .client import Client
    from .handoff import ConnectionHandoff, PendingCall, ServerHandoff
    from .server import Context, Handler, PeerCred, Server, require_same_user

__all__ = [
    "MAX_MESSAGE_SIZE",
    "Client",
    "ClosedError",
    "Code",
    "ConnectionHandoff",
    "Context",
    "Handler",
    "MessageTooLargeError",
    "PeerCred",
    "PendingCall",
    "ProtocolError",
    "Server",
    "ServerHandoff",
    "TTRPCError",
    "require_same_user",
]

_LAZY = {
    "Client": "client",
    "ConnectionHandoff": "handoff",
    "Context": "server",
    "Handler": "server",
    "PeerCred": "server",
    "PendingCall": "handoff",
    "Server": "server",
    "ServerHandoff": "handoff",
    "require_same_user": "server",
}


def __getattr__(name: str) -> "Any":
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
