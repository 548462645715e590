"""``containerd-shim-embed-v1``: the binary containerd runs for io.containerd.embed.v1.

containerd calls it with Go-style flags (``-namespace ns -address a -id x start``).  Each
subcommand imports only what it needs: ``start`` and ``delete`` run once per container and
must be quick, and so must ``-info`` (containerd 2.x asks it before using the runtime).  The
installed launcher (``shim.cmd.launcher``) runs Python without ``site`` for them; every other
subcommand turns it on first (the daemon needs protobuf from site-packages).  Run as the
program, they also end without the interpreter's finalisation.
This module imports only ``sys`` and ``posix`` (no ``os``, no ``__future__``).
"""

import posix
import sys

from shim.cmd.flags import NAME, VERSION, UsageError, enable_site, parse

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

USAGE = f"""usage: {NAME} [flags] <command>

commands:
  start     print the address of this containerd's daemon, starting it if needed
  delete    clean up one task after containerd has let go of it
  daemon    run the daemon (started by `start`)
  reload    upgrade the daemon in place (same pid; containers and connections kept)
  check     print which kernel features are present and the mode the daemon would use
  watch     stream exec/exit/OOM events of the processes inside our containers
            (--json, --ns NS, --id ID, --event exec,exit,oom, --stats: Prometheus counters)
  version   print the version

  -info     (containerd 2.x) read runtime options from stdin, write a RuntimeInfo protobuf
            (name, version, runc's features) to stdout

flags (as containerd passes them):
  -namespace NS -address ADDR -publish-binary PATH -id ID -bundle PATH -debug -v

daemon flags (as `start` passes them):
  -ttrpc-address ADDR -ready-fd FD -containerd-state DIR
"""


def _exit_now(code: int) -> "NoReturn":
    """End the process once stdout and stderr are flushed, skipping the interpreter's
    finalisation (tearing down every module: about 7M instructions, a fifth of ``start``).
    Nothing on the ``start``/``delete`` paths needs it: no atexit handler, every fd closed."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        code = 120  # what Python's own exit returns when it cannot flush stdout
    posix._exit(code)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand.  Without ``argv`` (the program's own command line), ``start`` and
    ``delete`` do not return: see :func:`_exit_now`."""
    args = sys.argv[1:] if argv is None else argv
    try:
        flags, rest = parse(args)
    except UsageError as exc:
        sys.stderr.write(f"{exc}\n{USAGE}")
        return 2
    if flags.v or flags.version or rest[:1] == ["version"]:
        sys.stdout.write(f"{NAME}:\n  Version: {VERSION}\n  Runtime: io.containerd.embed.v1\n")
        return 0
    if flags.info:
        # containerd 2.x: `<shim> -info`, options on stdin, a RuntimeInfo on stdout
        from shim.cmd.info import main as info

        code = info()
        if argv is None:
            _exit_now(code)
        return code
    if flags.h or flags.help or not rest:
        sys.stderr.write(USAGE)
        return 0 if (flags.h or flags.help) else 2
    command = rest[0]
    if command not in ("start", "delete"):
        enable_site()
    if command in ("start", "delete"):
        if command == "start":
            from shim.cmd.start import main as run
        else:
            from shim.cmd.delete import main as run
        code = run(flags)
        if argv is None:
            _exit_now(code)
        return code
    if command == "reload":
        from shim.cmd import reload

        return reload.main(flags)
    if command == "check":
        from shim.cmd import check

        return check.main(flags)
    if command == "watch":
        from shim.cmd import watchcli

        return watchcli.main(flags, rest[1:])
    if command == "daemon":
        import os

        # The daemon never speaks TLS: keep asyncio from loading ssl (OpenSSL costs ~4 MB).
        sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]
        from shim.cmd import daemon

        return daemon.main(
            flags.address,
            flags.ttrpc_address or os.environ.get("TTRPC_ADDRESS", ""),
            flags.debug,
            int(flags.ready_fd) if flags.ready_fd else -1,
            flags.containerd_state,
        )
    sys.stderr.write(f"unknown command {command!r}\n{USAGE}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
