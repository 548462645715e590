"""``containerd-shim-embed-v1 -info``: what containerd 2.x asks a runtime's shim before using it.

containerd (2.0 and later) runs ``<shim> -info`` (a flag, not a command) with the runtime's
options on stdin, a serialized ``google.protobuf.Any`` (what it would send with Create: CRI's
options for the handler, or nothing), and reads a ``containerd.types.RuntimeInfo`` from
stdout (api/types/introspection.proto)::

    RuntimeInfo {
      string name = 1;                    // io.containerd.embed.v1
      RuntimeVersion version = 2;         // {string version = 1; string revision = 2}
      google.protobuf.Any options = 3;    // the options it sent, as read
      google.protobuf.Any features = 4;   // the OCI runtime's features, FEATURES_TYPE
      map<string, string> annotations = 5;  // none
    }

(``features`` holds JSON, runtime-spec's features.md: containerd's typeurl registers that Go
struct under FEATURES_TYPE and marshals it as JSON.)

CRI reads ``features`` once per runtime handler when it starts: ``rro`` among its
``mountOptions`` is what lets a container have a recursive read-only mount (Kubernetes
``recursiveReadOnly: Enabled``), its namespaces and idmap mounts decide user namespaces.  The
task manager runs it again before the first Create of each runtime (and logs "failed to load
runtime info" for every Create while it fails).

``features`` is the output of ``runc features`` of the runc the daemon would run for those
options, read by Create's own code (``shim.oci.runcoptions``): ``BinaryName`` and ``Root`` from
``containerd.runc.v1.Options`` or from CRI's ``runtimeoptions.v1.Options`` (the handler's
``options`` table, or its ``ConfigPath`` file), runc from containerd's PATH otherwise.  A
runc that has no ``features`` command (older than 1.1) gives a RuntimeInfo without features,
as containerd's own runc shim does; options the daemon would refuse, or a runc that is not
there, end in an error (exit status 1, the reason on stderr, which containerd logs).

Without options (the task manager's call, and CRI's for a handler without an ``options``
table) it runs on the path ``start`` and ``delete`` take (no ``site``, built-in modules only:
see ``tests/test_startup.py``; about 10 ms); with options it also loads protobuf to read
them (about 70 ms).  It never starts the daemon; the only other process is ``runc
features``.
"""

import posix
import sys

from shim.cmd.flags import VERSION
from shim.util import wire

RUNTIME_NAME = "io.containerd.embed.v1"
FEATURES_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/features/Features"
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class InfoError(Exception):
    pass


def runc_for(options: bytes) -> tuple[str, str]:
    """(runc's name or path, the ``Root`` setting or "") for the options Any ``options`` (b"":
    none), read by the code Create reads them with (shim.oci.runcoptions); InfoError for what
    Create refuses."""
    if not options:
        return "runc", ""
    try:
        fields = wire.read_fields(options)
        type_url = _string(fields, 1)
        value = _bytes(fields, 2)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InfoError(f"options: not a google.protobuf.Any: {exc}") from None
    # Options come only from CRI's handler tables (once per handler when CRI starts): the
    # decoder Create uses (protobuf, TOML) is worth its 60 ms here, rather than a copy of it.
    from shim.cmd.flags import enable_site

    enable_site()
    from shim.oci import runcoptions
    from shim.ttrpc import TTRPCError

    try:
        opts = runcoptions.decode_options(type_url, value)
    except TTRPCError as exc:
        raise InfoError(exc.message) from None
    return opts.binary, opts.root


def _string(fields: dict[int, list[int | bytes]], number: int) -> str:
    value = fields.get(number, [b""])[-1]
    if not isinstance(value, bytes):
        raise ValueError(f"field {number} is not a string")
    return value.decode()


def _bytes(fields: dict[int, list[int | bytes]], number: int) -> bytes:
    value = fields.get(number, [b""])[-1]
    if not isinstance(value, bytes):
        raise ValueError(f"field {number} is not bytes")
    return value


def find_executable(name: str, path: str) -> str | None:
    """What shim.oci.runc.find_executable finds (the daemon's lookup), on posix alone."""
    candidates = [name] if "/" in name else [f"{d or '.'}/{name}" for d in path.split(":")]
    for candidate in candidates:
        try:
            if posix.access(candidate, posix.X_OK) and not _is_dir(candidate):
                return candidate
        except (OSError, ValueError):
            pass
    return None


def _is_dir(path: str) -> bool:
    return posix.stat(path).st_mode & 0o170000 == 0o040000


def runc_features(runc: str, root: str) -> bytes | None:
    """``runc [--root R] features``'s JSON, or None if it fails (no such command)."""
    argv = [runc, *(["--root", root] if root else []), "features"]
    r, w = posix.pipe2(posix.O_CLOEXEC)
    try:
        pid = posix.posix_spawn(
            runc,
            argv,
            posix.environ,
            file_actions=[
                (posix.POSIX_SPAWN_OPEN, 0, "/dev/null", posix.O_RDONLY, 0),
                (posix.POSIX_SPAWN_DUP2, w, 1),
            ],
        )
    finally:
        posix.close(w)
    chunks = []
    try:
        while True:
            chunk = posix.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        posix.close(r)
    _, status = posix.waitpid(pid, 0)
    out = b"".join(chunks).strip()
    if status != 0 or not (out.startswith(b"{") and out.endswith(b"}")):
        return None
    return out


def runtime_info(options: bytes, path: str) -> bytes:
    """The RuntimeInfo for the options Any ``options``, runc looked up on ``path``."""
    binary, root = runc_for(options)
    runc = find_executable(binary, path)
    if runc is None:
        raise InfoError(f"runc: {binary!r} not found or not executable (PATH={path})")
    version = wire.bytes_field(1, VERSION.encode())
    out = wire.bytes_field(1, RUNTIME_NAME.encode()) + wire.bytes_field(2, version)
    if options:
        out += wire.bytes_field(3, options)
    features = runc_features(runc, root)
    if features is not None:
        any_ = wire.bytes_field(1, FEATURES_TYPE.encode()) + wire.bytes_field(2, features)
        out += wire.bytes_field(4, any_)
    return out


def _read_stdin() -> bytes:
    """The options containerd writes, then closes; nothing from a terminal (run by hand)."""
    if sys.stdin is None:
        return b""
    try:
        if posix.isatty(0):
            return b""
        return sys.stdin.buffer.read()
    except (OSError, ValueError):
        return b""


def main() -> int:
    path = posix.environ.get(b"PATH", _DEFAULT_PATH.encode()).decode(errors="surrogateescape")
    try:
        out = runtime_info(_read_stdin(), path)
    except (InfoError, OSError) as exc:
        sys.stderr.write(f"{RUNTIME_NAME} -info: {exc}\n")
        return 1
    sys.stdout.buffer.write(out)
    return 0
