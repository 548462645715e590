"""The command line containerd passes the shim: Go-style flags, and the program's name.

Every subcommand (``start``, ``delete``, ``check``, ``reload``, the daemon) reads its flags
from here; ``shim.cmd.cli`` only dispatches.  Also the one word the C entry point
(``entry/entry.c``) passes Python besides the arguments: :func:`take_daemon_silent`.  Like
``shim.cmd.cli`` this module imports only ``sys`` and ``posix`` (no ``os``, no ``__future__``):
``start`` and ``delete`` import it.
"""

import posix
import sys

VERSION = "0.1.0"
NAME = "containerd-shim-embed-v1"
_BOOL_FLAGS = {"debug", "v", "version", "info", "h", "help"}
_VALUE_FLAGS = {
    "namespace",
    "address",
    "publish-binary",
    "id",
    "bundle",
    "socket",
    "ttrpc-address",
    "ready-fd",
    "containerd-state",
}


class Flags:
    """The flags containerd passes (Go ``flag`` names, dashes as underscores)."""

    def __init__(self) -> None:
        self.namespace = ""
        self.address = ""
        self.publish_binary = ""
        self.id = ""
        self.bundle = ""
        self.socket = ""
        self.ttrpc_address = ""
        self.ready_fd = ""
        self.containerd_state = ""
        self.debug = False
        self.v = False
        self.version = False
        self.info = False
        self.h = False
        self.help = False


class UsageError(Exception):
    pass


def parse(argv: list[str]) -> tuple[Flags, list[str]]:
    """Parse Go ``flag`` style arguments: ``-f v``, ``-f=v``, ``--f v``; flags stop at the
    first non-flag argument (the command)."""
    flags = Flags()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--" or not arg.startswith("-") or arg == "-":
            break
        name, eq, value = arg.lstrip("-").partition("=")
        if name in _BOOL_FLAGS:
            setattr(flags, name, value.lower() not in ("false", "0") if eq else True)
        elif name in _VALUE_FLAGS:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise UsageError(f"flag needs an argument: -{name}")
                value = argv[i]
            setattr(flags, name.replace("-", "_"), value)
        else:
            raise UsageError(f"flag provided but not defined: -{name}")
        i += 1
    rest = argv[i:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    return flags, rest


SILENT_ENV = "EMBEDSHIM_DAEMON_SILENT"


def take_daemon_silent() -> bool:
    """Whether the C entry point (entry/entry.c) reached the daemon and got no proper answer
    before handing this ``start``/``delete`` to Python: then it is not asked again (one
    timeout, as before).  The variable is removed, so nothing spawned from here inherits it."""
    if posix.environ.pop(SILENT_ENV.encode(), None) is None:
        return False
    posix.unsetenv(SILENT_ENV)
    os = sys.modules.get("os")
    if os is not None:
        os.environ.pop(SILENT_ENV, None)
    return True


def enable_site() -> None:
    """What ``python`` without ``-S`` would have done at start-up: site-packages on sys.path."""
    if sys.flags.no_site and "site" not in sys.modules:
        import site

        site.main()
