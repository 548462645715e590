"""runc's settings for a task: from the runtime options containerd sends, and the bundle.

containerd sends a task's runtime options as an Any in CreateTaskRequest.options:

* ``containerd.runc.v1.Options`` (the runc shim's own message): from ``ctr run
  --runc-binary/--runc-root/--runc-systemd-cgroup``, or from CRI for the runtime types
  ``io.containerd.runc.*`` only.
* ``runtimeoptions.v1.Options``: what CRI sends for every other runtime type, ours included,
  when the handler has an ``options`` table.  ``config_path`` is the table's ``ConfigPath``
  (every version since 1.6): a TOML file, read here, with the settings at its top level.
  ``config_body`` is the whole table as TOML (containerd 1.7 and 2.x, only when the table has
  no ``ConfigPath``; 1.6 never sends it, so there a table without ``ConfigPath`` reaches us
  empty).

Settings in TOML carry the runc shim's names (``SystemdCgroup``, ``BinaryName``, ``Root``,
...: the Go field names of containerd.runc.v1.Options, matched without regard to case, as
containerd's TOML decoder matches them for the runc shim).  A name that is not one of them is
refused (InvalidArgument naming it): a misspelt setting must not be silently ignored.

And the bundle: when the spec's ``linux.cgroupsPath`` is in systemd's ``slice:prefix:name``
form (what CRI writes when the kubelet's cgroup parent is a systemd slice, i.e. the kubelet
uses the systemd cgroup driver) runc runs with ``--systemd-cgroup`` whatever the settings say:
runc's cgroupfs driver would take that string for a directory name.

What a task ran with is stored as a ``containerd.runc.v1.Options`` Any (:func:`stored`), so
a restarted daemon and the offline ``delete`` see the same settings without reading any file
again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from shim.api import runc_options_pb2, runtimeoptions_pb2
from shim.oci.bundle import PATH_MAX
from shim.util import errors

RUNC_OPTIONS = "containerd.runc.v1.Options"
RUNTIME_OPTIONS = "runtimeoptions.v1.Options"
#: a ConfigPath file larger than this is refused
MAX_CONFIG_FILE = 1 << 20

#: runc shim setting name -> (Options field, TOML type).  All of containerd.runc.v1.Options,
#: so a table written for the runc shim is accepted; those a single daemon has no use for
#: (ShimCgroup, IoUid, IoGid, CriuImagePath, TaskApiAddress, TaskApiVersion) are ignored, as
#: they are when they come as containerd.runc.v1.Options.
SETTINGS: dict[str, tuple[str, type]] = {
    "NoPivotRoot": ("no_pivot_root", bool),
    "NoNewKeyring": ("no_new_keyring", bool),
    "ShimCgroup": ("shim_cgroup", str),
    "IoUid": ("io_uid", int),
    "IoGid": ("io_gid", int),
    "BinaryName": ("binary_name", str),
    "Root": ("root", str),
    "CriuPath": ("criu_path", str),
    "SystemdCgroup": ("systemd_cgroup", bool),
    "CriuImagePath": ("criu_image_path", str),
    "CriuWorkPath": ("criu_work_path", str),
    "TaskApiAddress": ("", str),
    "TaskApiVersion": ("", int),
}
#: keys of a runtimeoptions table that are containerd's, not runc's
_RUNTIMEOPTIONS_KEYS = ("TypeUrl", "ConfigPath")
_BY_LOWER = {name.lower(): name for name in (*SETTINGS, *_RUNTIMEOPTIONS_KEYS)}


@dataclass
class RuncOptions:
    root: str = ""
    binary: str = "runc"
    systemd_cgroup: bool = False
    no_pivot: bool = False
    no_new_keyring: bool = False
    criu: str = ""
    criu_work_path: str = ""
    #: where the settings came from, for the log: "" (none sent), the message type, or
    #: "config_body" / "config_path <file>"
    source: str = ""


def decode_options(type_url: str, value: bytes) -> RuncOptions:
    """The runtime options containerd passes; an unknown type is refused."""
    if not type_url:
        return RuncOptions()
    name = type_url.rsplit("/", 1)[-1]
    if name == RUNC_OPTIONS:
        opts = runc_options_pb2.Options()
        try:
            opts.ParseFromString(value)
        except Exception as exc:
            raise errors.invalid(f"options: bad {RUNC_OPTIONS}: {exc}") from None
        return _checked(opts, RUNC_OPTIONS)
    if name == RUNTIME_OPTIONS:
        ropts = runtimeoptions_pb2.Options()
        try:
            ropts.ParseFromString(value)
        except Exception as exc:
            raise errors.invalid(f"options: bad {RUNTIME_OPTIONS}: {exc}") from None
        if ropts.config_path:
            path = ropts.config_path
            if not is_clean_absolute(path):
                raise errors.invalid(
                    f"options.config_path: {path[:100]!r} is not a clean absolute path"
                )
            table = parse_toml(_read_config(path), f"config_path {path}")
            return _checked(from_table(table, path), f"config_path {path}", toml=True)
        if ropts.config_body:
            table = parse_toml(ropts.config_body, "config_body")
            return _checked(from_table(table, "config_body"), "config_body", toml=True)
        return RuncOptions(source=f"{RUNTIME_OPTIONS} without settings")
    raise errors.invalid(f"options: unsupported type {type_url[:200]!r}")


def _read_config(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_FILE + 1)
    except OSError as exc:
        raise errors.invalid(f"options.config_path: cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_CONFIG_FILE:
        raise errors.invalid(f"options.config_path: {path} is larger than {MAX_CONFIG_FILE}")
    return data


def parse_toml(data: bytes, what: str) -> dict[str, Any]:
    import tomllib

    try:
        return tomllib.loads(data.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise errors.invalid(f"options: {what} is not valid TOML: {exc}") from None


def from_table(table: dict[str, Any], where: str) -> runc_options_pb2.Options:
    """containerd.runc.v1.Options from a TOML table of runc shim settings (see module doc)."""
    opts = runc_options_pb2.Options()
    for key, value in table.items():
        name = _BY_LOWER.get(key.lower())
        if name in _RUNTIMEOPTIONS_KEYS:
            continue
        if name is None:
            raise errors.invalid(
                f"options: {where}: unknown setting {key[:100]!r} "
                f"(runc's settings are {', '.join(SETTINGS)})"
            )
        field, kind = SETTINGS[name]
        # bool is an int in Python; TOML keeps them apart, and so do we
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise errors.invalid(
                f"options: {where}: {name} must be a TOML {_TOML_TYPE[kind]}, "
                f"not {str(value)[:100]!r}"
            )
        if isinstance(value, int) and not 0 <= value < 1 << 32:
            raise errors.invalid(f"options: {where}: {name} {value} is out of range")
        if field:
            setattr(opts, field, value)
    return opts


_TOML_TYPE = {bool: "boolean", str: "string", int: "integer"}
_TOML_NAME = {field: name for name, (field, _) in SETTINGS.items() if field}


def _checked(opts: runc_options_pb2.Options, source: str, toml: bool = False) -> RuncOptions:
    """The settings, each path checked; a problem is named ``options.<field>`` (the proto's
    name), or ``options: <source>: <Setting>`` (the TOML name) for settings from TOML."""

    def where(field: str) -> str:
        return f"options: {source}: {_TOML_NAME[field]}" if toml else f"options.{field}"

    for field, name in (("binary_name", opts.binary_name), ("criu_path", opts.criu_path)):
        if name and not (is_clean_absolute(name) or _is_plain_name(name)):
            raise errors.invalid(
                f"{where(field)}: {name[:100]!r} is neither a command name "
                "nor a clean absolute path"
            )
    for field, path in (("root", opts.root), ("criu_work_path", opts.criu_work_path)):
        if path and not is_clean_absolute(path):
            raise errors.invalid(f"{where(field)}: {path[:100]!r} is not a clean absolute path")
    return RuncOptions(
        root=opts.root,
        binary=opts.binary_name or "runc",
        systemd_cgroup=opts.systemd_cgroup,
        no_pivot=opts.no_pivot_root,
        no_new_keyring=opts.no_new_keyring,
        criu=opts.criu_path,
        criu_work_path=opts.criu_work_path,
        source=source,
    )


def is_clean_absolute(path: str) -> bool:
    return (
        os.path.isabs(path)
        and "\0" not in path
        and len(path) <= PATH_MAX
        and os.path.normpath(path) == path
        and not path.startswith("//")
    )


def _is_plain_name(name: str) -> bool:
    return name not in (".", "..") and "/" not in name and "\0" not in name and len(name) <= 255


def is_systemd_cgroups_path(path: object) -> bool:
    """Is ``path`` in systemd's ``slice:prefix:name`` form (runc's systemd driver)?  CRI
    writes ``<parent>.slice:cri-containerd:<id>`` when the cgroup parent is a slice; the
    slice may be empty (runc then uses system.slice).  A cgroupfs path has no colon."""
    if not isinstance(path, str):
        return False
    parts = path.split(":")
    if len(parts) != 3 or not parts[2] or any("/" in p or "\0" in p for p in parts):
        return False
    return parts[0] == "" or parts[0].endswith(".slice")


def for_bundle(opts: RuncOptions, spec: dict[str, Any]) -> tuple[RuncOptions, bool]:
    """``opts`` with the systemd driver turned on if the spec's cgroupsPath needs it; and
    whether that was the bundle's doing (no setting asked for it)."""
    linux = spec.get("linux")
    path = linux.get("cgroupsPath") if isinstance(linux, dict) else None
    if opts.systemd_cgroup or not is_systemd_cgroups_path(path):
        return opts, False
    return replace(opts, systemd_cgroup=True), True


def stored(opts: RuncOptions) -> bytes:
    """What a task ran with, as a serialized Any of containerd.runc.v1.Options (the field
    the statestore keeps and ``delete`` reads ``binary_name`` from)."""
    from shim.api import shim_pb2

    msg = runc_options_pb2.Options(
        root=opts.root,
        binary_name=opts.binary if opts.binary != "runc" else "",
        systemd_cgroup=opts.systemd_cgroup,
        no_pivot_root=opts.no_pivot,
        no_new_keyring=opts.no_new_keyring,
        criu_path=opts.criu,
        criu_work_path=opts.criu_work_path,
    )
    req = shim_pb2.CreateTaskRequest()
    req.options.type_url = RUNC_OPTIONS
    req.options.value = msg.SerializeToString()
    return bytes(req.options.SerializeToString())
