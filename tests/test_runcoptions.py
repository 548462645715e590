"""runc's settings from runtimeoptions.v1.Options (CRI's message for non-runc runtime types)
and the systemd cgroup driver from a spec's cgroupsPath (shim/oci/runcoptions.py)."""

from __future__ import annotations

import os

import pytest

from shim.api import runc_options_pb2, runtimeoptions_pb2
from shim.cmd.delete import _runc_binary
from shim.oci.runcoptions import (
    MAX_CONFIG_FILE,
    RUNC_OPTIONS,
    RUNTIME_OPTIONS,
    SETTINGS,
    RuncOptions,
    decode_options,
    for_bundle,
    is_systemd_cgroups_path,
    stored,
)
from shim.ttrpc.errors import Code, TTRPCError


def runtime_options(path: str = "", body: str | bytes = b"") -> bytes:
    raw = body.encode() if isinstance(body, str) else body
    return runtimeoptions_pb2.Options(config_path=path, config_body=raw).SerializeToString()


def refused(prefix: str, type_url: str, value: bytes) -> str:
    with pytest.raises(TTRPCError) as info:
        decode_options(type_url, value)
    assert info.value.code == Code.INVALID_ARGUMENT, info.value
    assert info.value.message.startswith(prefix), info.value.message
    return info.value.message


# containerd 2.x marshals the handler's options table with go-toml v2 (literal strings)
BODY_2X = "BinaryName = '/usr/local/bin/my-runc'\nRoot = '/run/k8s-runc'\nSystemdCgroup = true\n"


def test_config_body_carries_runc_settings() -> None:
    got = decode_options(RUNTIME_OPTIONS, runtime_options(body=BODY_2X))
    assert got == RuncOptions(
        root="/run/k8s-runc",
        binary="/usr/local/bin/my-runc",
        systemd_cgroup=True,
        source="config_body",
    )


def test_config_path_names_a_toml_file(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "embed-runc.toml")
    with open(path, "w") as f:
        f.write('# for embedshim\nSystemdCgroup = true\nNoPivotRoot = true\nCriuPath = "criu"\n')
    got = decode_options(RUNTIME_OPTIONS, runtime_options(path=path))
    assert (got.systemd_cgroup, got.no_pivot, got.criu, got.binary) == (True, True, "criu", "runc")
    assert got.source == f"config_path {path}"
    # a path wins over a body (containerd sends the body only without a path)
    got = decode_options(RUNTIME_OPTIONS, runtime_options(path=path, body="SystemdCgroup = false"))
    assert got.systemd_cgroup


def test_names_match_without_case_and_containerd_keys_are_skipped() -> None:
    body = 'systemdcgroup = true\nBINARYNAME = "crun"\nTypeUrl = "x"\nconfigpath = ""\n'
    got = decode_options(RUNTIME_OPTIONS, runtime_options(body=body))
    assert (got.systemd_cgroup, got.binary) == (True, "crun")


def test_every_runc_shim_setting_is_accepted() -> None:
    """A table written for io.containerd.runc.v2 is accepted whole (the settings a single
    daemon has no use for are ignored, as in containerd.runc.v1.Options)."""
    values = {bool: "true", str: '"/x"', int: "1000"}
    body = "\n".join(f"{name} = {values[kind]}" for name, (_, kind) in SETTINGS.items())
    got = decode_options(RUNTIME_OPTIONS, runtime_options(body=body))
    assert got.systemd_cgroup and got.binary == "/x" and got.root == "/x"


def test_no_settings() -> None:
    """containerd 1.6 with an options table but no ConfigPath sends an empty message; 2.x an
    empty table as an empty body."""
    got = decode_options(RUNTIME_OPTIONS, b"")
    assert got == RuncOptions(source=f"{RUNTIME_OPTIONS} without settings")
    assert decode_options(f"types.containerd.io/{RUNTIME_OPTIONS}", b"").binary == "runc"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("SystemdCgroups = true", "options: config_body: unknown setting 'SystemdCgroups'"),
        ("systemd_cgroup = true", "options: config_body: unknown setting 'systemd_cgroup'"),
        ('SystemdCgroup = "true"', "options: config_body: SystemdCgroup must be a TOML boolean"),
        ("BinaryName = 1", "options: config_body: BinaryName must be a TOML string"),
        ("IoUid = true", "options: config_body: IoUid must be a TOML integer"),
        ("IoUid = -1", "options: config_body: IoUid -1 is out of range"),
        ('BinaryName = "../runc"', "options: config_body: BinaryName: '../runc' is neither"),
        ('Root = "run/runc"', "options: config_body: Root: 'run/runc' is not a clean absolute"),
        ('CriuWorkPath = "/a/../b"', "options: config_body: CriuWorkPath: '/a/../b' is not"),
        ("SystemdCgroup = ", "options: config_body is not valid TOML"),
        (b"\xff", "options: config_body is not valid TOML"),
    ],
)
def test_bad_settings_refused(body: str | bytes, message: str) -> None:
    refused(message, RUNTIME_OPTIONS, runtime_options(body=body))


def test_bad_config_path_refused(tmp_path: os.PathLike[str]) -> None:
    refused("options.config_path: 'etc/x.toml' is not a clean", RUNTIME_OPTIONS,
            runtime_options(path="etc/x.toml"))  # fmt: skip
    missing = os.path.join(tmp_path, "missing.toml")
    refused(f"options.config_path: cannot read {missing}", RUNTIME_OPTIONS,
            runtime_options(path=missing))  # fmt: skip
    big = os.path.join(tmp_path, "big.toml")
    with open(big, "w") as f:
        f.write("#" * (MAX_CONFIG_FILE + 1))
    refused(f"options.config_path: {big} is larger", RUNTIME_OPTIONS, runtime_options(path=big))
    typo = os.path.join(tmp_path, "typo.toml")
    with open(typo, "w") as f:
        f.write("SystemdCgrup = true\n")
    refused(f"options: {typo}: unknown setting 'SystemdCgrup'", RUNTIME_OPTIONS,
            runtime_options(path=typo))  # fmt: skip
    refused(f"options: bad {RUNTIME_OPTIONS}", RUNTIME_OPTIONS, b"\xff\xff")


@pytest.mark.parametrize(
    ("path", "systemd"),
    [
        ("kubepods-besteffort-pod0d4c.slice:cri-containerd:5f3a", True),  # what CRI writes
        ("kubepods.slice:cri-containerd:5f3a", True),
        (":cri-containerd:5f3a", True),  # runc: the default slice
        ("system.slice:docker:", False),  # no name
        ("/kubepods/besteffort/pod0d4c/5f3a", False),  # cgroupfs
        ("kubepods/pod0d4c/5f3a", False),
        ("pod:cri-containerd:5f3a", False),  # not a slice
        ("a.slice:b:c:d", False),
        ("/a.slice:b:c", False),
        ("", False),
        (None, False),
        (7, False),
    ],
)
def test_systemd_cgroups_path(path: object, systemd: bool) -> None:
    assert is_systemd_cgroups_path(path) == systemd


def test_the_bundle_turns_the_systemd_driver_on() -> None:
    spec = {"linux": {"cgroupsPath": "kubepods.slice:cri-containerd:c1"}}
    got, by_path = for_bundle(RuncOptions(binary="crun"), spec)
    assert got == RuncOptions(binary="crun", systemd_cgroup=True) and by_path
    got, by_path = for_bundle(RuncOptions(systemd_cgroup=True), spec)  # a setting did already
    assert got.systemd_cgroup and not by_path
    for cgroupfs in ({"linux": {"cgroupsPath": "/kubepods/c1"}}, {"linux": {}}, {}):
        assert for_bundle(RuncOptions(), cgroupfs) == (RuncOptions(), False)


def test_stored_settings_round_trip() -> None:
    """What a task ran with is kept as containerd.runc.v1.Options: a restarted daemon decodes
    it without the ConfigPath file, and the offline delete finds runc's binary in it."""
    opts = RuncOptions(
        root="/run/r",
        binary="/opt/bin/runc",
        systemd_cgroup=True,
        no_pivot=True,
        no_new_keyring=True,
        criu="/usr/sbin/criu",
        criu_work_path="/w",
        source="config_path /gone.toml",
    )
    from shim.api import shim_pb2

    blob = stored(opts)
    any_ = shim_pb2.CreateTaskRequest().options
    any_.ParseFromString(blob)
    assert any_.type_url == RUNC_OPTIONS
    assert decode_options(any_.type_url, any_.value) == RuncOptions(
        **{**opts.__dict__, "source": RUNC_OPTIONS}
    )
    assert _runc_binary(blob) == "/opt/bin/runc"
    assert _runc_binary(stored(RuncOptions(systemd_cgroup=True))) == "runc"
    parsed = runc_options_pb2.Options.FromString(any_.value)
    assert parsed.systemd_cgroup and parsed.binary_name == "/opt/bin/runc"
