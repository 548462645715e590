"""What the daemon refuses before anything reaches runc or the filesystem: bundle paths,
stdio names, runtime options.  Each refusal is InvalidArgument naming the field."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

import pytest

from shim.api import runc_options_pb2
from shim.io import stdio
from shim.oci import bundle
from shim.oci.mount import Mount
from shim.tasks.execprocess import parse_spec
from shim.tasks.task import RUNC_OPTIONS, decode_options
from shim.ttrpc import Code, TTRPCError


def _refused(field: str, fn: object, *args: object) -> str:
    with pytest.raises(TTRPCError) as info:
        fn(*args)  # type: ignore[operator]
    assert info.value.code == Code.INVALID_ARGUMENT, info.value
    assert info.value.message.startswith(field + ":"), info.value.message
    return info.value.message


@pytest.fixture
def state(tmp_path: object) -> Iterator[str]:
    """A containerd state dir with one real bundle, test/c1, as containerd lays it out."""
    root = os.path.realpath(str(tmp_path))
    state = os.path.join(root, "state")
    os.makedirs(os.path.join(state, bundle.TASK_DIR, "test", "c1"))
    yield state


def _path(state: str, ns: str = "test", id: str = "c1") -> str:
    return os.path.join(state, bundle.TASK_DIR, ns, id)


def test_bundle_where_containerd_puts_it_is_accepted(state: str) -> None:
    assert bundle.check_path(_path(state), "test", "c1", (state,)) == _path(state)


def test_bundle_roots_learned_else_default_and_the_environment_overrides(
    state: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(bundle.ROOTS_ENV, raising=False)
    # A daemon told nothing: containerd's default state directory, as before.
    assert bundle.allowed_roots() == ("/run/containerd",)
    assert bundle.roots_source() == "default"
    message = _refused("bundle", bundle.check_path, _path(state), "test", "c1")
    assert bundle.ROOTS_ENV in message and "/run/containerd" in message
    # Told its containerd's state directory (by start): that one only.
    assert bundle.allowed_roots(state) == (state,)
    assert bundle.roots_source(state) == "containerd's state directory"
    assert bundle.check_path(_path(state), "test", "c1", bundle.allowed_roots(state))
    message = _refused(
        "bundle",
        bundle.check_path,
        _path("/run/containerd"),
        "test",
        "c1",
        bundle.allowed_roots(state),
    )
    assert f"({state}; {bundle.ROOTS_ENV} overrides it)" in message
    # The variable overrides what was learned.
    monkeypatch.setenv(bundle.ROOTS_ENV, f"/run/k3s/containerd:{state}/:relative")
    assert bundle.allowed_roots() == ("/run/k3s/containerd", state)
    assert bundle.allowed_roots("/run/other") == ("/run/k3s/containerd", state)
    assert bundle.roots_source("/run/other") == bundle.ROOTS_ENV
    assert bundle.check_path(_path(state), "test", "c1") == _path(state)


@pytest.mark.parametrize(
    ("path", "state"),
    [
        ("/run/containerd/io.containerd.runtime.v2.task/default/c1", "/run/containerd"),
        ("/run/k3s/containerd/io.containerd.runtime.v2.task/k8s.io/c1", "/run/k3s/containerd"),
        (
            "/var/snap/microk8s/common/run/containerd/io.containerd.runtime.v2.task/ns/c1",
            "/var/snap/microk8s/common/run/containerd",
        ),
        # the last task directory counts, as in check_path
        (
            "/a/io.containerd.runtime.v2.task/x/io.containerd.runtime.v2.task/ns/c1",
            "/a/io.containerd.runtime.v2.task/x",
        ),
        ("/io.containerd.runtime.v2.task/ns/c1", None),  # <state> would be /
        ("/run/containerd/io.containerd.runtime.v2.task/other/c1", None),
        ("/run/containerd/io.containerd.runtime.v2.task/ns/c2", None),
        ("/run/containerd/io.containerd.runtime.v2.task/ns/c1/", None),
        ("/run/containerd/io.containerd.runtime.v2.task/ns/x/../c1", None),
        ("/run/containerd/io.containerd.runtime.v2.task/x/../ns/c1", None),
        ("/run//containerd/io.containerd.runtime.v2.task/ns/c1", None),
        ("//run/containerd/io.containerd.runtime.v2.task/ns/c1", None),
        ("run/containerd/io.containerd.runtime.v2.task/ns/c1", None),
        ("/run/containerd/io.containerd.runtime.v2.task/ns/c1\0", None),
        ("/run/containerd/runtime/ns/c1", None),
        ("", None),
    ],
)
def test_state_of_a_bundle_path(path: str, state: str | None) -> None:
    id = "c1"
    ns = "default" if "/default/" in path else "k8s.io" if "k8s.io" in path else "ns"
    assert bundle.state_of(path, ns, id) == state


def test_state_of_agrees_with_check_path(state: str) -> None:
    path = _path(state)
    learned = bundle.state_of(path, "test", "c1")
    assert learned == state
    assert bundle.check_path(path, "test", "c1", bundle.allowed_roots(learned)) == path


def test_a_state_directory_through_a_symbolic_link_is_named_in_the_refusal(
    state: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """containerd configured with ``state = "/var/run/containerd"`` (a link to /run): start's
    working directory says /run/containerd, its Creates /var/run/containerd.  Refused, as
    before, with the override to use in the message."""
    monkeypatch.delenv(bundle.ROOTS_ENV, raising=False)
    alias = os.path.join(os.path.dirname(state), "alias")
    os.symlink(state, alias)
    message = _refused("bundle", bundle.check_path, _path(alias), "test", "c1", (state,))
    assert f"{alias} leads to it through a symbolic link" in message


@pytest.mark.parametrize(
    "make",
    [
        lambda s: "",
        lambda s: "relative/io.containerd.runtime.v2.task/test/c1",
        lambda s: _path(s) + "/",
        lambda s: _path(s) + "/.",
        lambda s: os.path.join(s, bundle.TASK_DIR, "test", "x", "..", "c1"),
        lambda s: "/" + _path(s),
        lambda s: _path(s) + "\0",
        lambda s: _path(s) + "/" + "a" * 5000,
        lambda s: _path(s, "other"),  # namespace of the request is test
        lambda s: _path(s, "test", "c2"),  # id of the request is c1
        lambda s: os.path.join(s, "somewhere-else", "test", "c1"),
        lambda s: os.path.join(s, "sub", bundle.TASK_DIR, "test", "c1"),  # root not allowed
        lambda s: "/etc",
    ],
    ids=[
        "empty",
        "relative",
        "trailing-slash",
        "dot",
        "dotdot",
        "double-slash",
        "nul",
        "10k",
        "other-namespace",
        "other-id",
        "not-task-dir",
        "outside-roots",
        "etc",
    ],
)
def test_bundle_paths_refused(state: str, make: object) -> None:
    path = make(state)  # type: ignore[operator]
    _refused("bundle", bundle.check_path, path, "test", "c1", (state,))


def test_symlinked_bundle_refused(state: str) -> None:
    target = os.path.join(os.path.dirname(state), "elsewhere")
    os.makedirs(target)
    os.symlink(target, _path(state, "test", "c2"))
    message = _refused(
        "bundle", bundle.check_path, _path(state, "test", "c2"), "test", "c2", (state,)
    )
    assert "symbolic link" in message
    # A symlinked namespace directory is refused the same way.
    os.symlink(os.path.join(state, bundle.TASK_DIR, "test"), _path(state, "ns2", "")[:-1])
    _refused("bundle", bundle.check_path, _path(state, "ns2", "c1"), "ns2", "c1", (state,))


def test_symlinked_rootfs_and_config_refused(state: str) -> None:
    path = _path(state)
    os.symlink("/etc/hostname", os.path.join(path, "config.json"))
    _refused("bundle", bundle.Bundle.load, path)
    os.unlink(os.path.join(path, "config.json"))
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write("{}")
    b = bundle.Bundle.load(path)
    b.check_rootfs()  # no rootfs yet: fine, it is created as a directory
    os.symlink("/", b.rootfs)
    _refused("bundle", b.check_rootfs)


# -- stdio ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "uri"),
    [
        ("stdout", "relative/fifo"),
        ("stdout", "/a/../etc/passwd"),
        ("stdout", "/a//b"),
        ("stdout", "/a/b\0"),
        ("stdout", "http://example.com/x"),
        ("stdout", "file://host/var/log/x"),
        ("stdout", "file:///var/log/x?q=1"),
        ("stderr", "fifo://relative"),
        ("stderr", "/" + "x" * 5000),
        ("stdin", "file:///etc/shadow"),
        ("stdin", "binary:///bin/sh"),
        ("stdin", "../fifo"),
    ],
)
def test_stdio_refused(field: str, uri: str) -> None:
    io = stdio.Stdio(**{field: uri})  # type: ignore[arg-type]
    _refused(field, io.check)


def test_stdio_accepted_forms() -> None:
    stdio.Stdio(
        stdin="/run/containerd/fifo/1/c-stdin",
        stdout="/run/containerd/fifo/1/c-stdout",
        stderr="fifo:///run/containerd/fifo/1/c-stderr",
    ).check()
    stdio.Stdio(stdout="file:///var/log/c.log", stderr="file:///var/log/c.log").check()
    stdio.Stdio(
        stdout="binary:///usr/bin/logger?tag=x", stderr="binary:///usr/bin/logger?tag=x"
    ).check()
    assert stdio.path_of("stdout", "fifo:///f") == "/f"
    for uri in ("binary://host/usr/bin/logger", "binary:///usr/bin/../bin/sh"):
        _refused("stdout", stdio.Stdio(stdout=uri).check)


def test_stdio_opens_only_fifos_and_never_through_symlinks(tmp_path: object) -> None:
    d = str(tmp_path)
    fifo = os.path.join(d, "out")
    os.mkfifo(fifo)
    regular = os.path.join(d, "regular")
    open(regular, "w").close()
    link = os.path.join(d, "link")
    os.symlink(fifo, link)
    fds = [stdio.open_input(fifo), stdio.open_output("stdout", fifo)]
    try:
        assert stat.S_ISFIFO(os.fstat(fds[1]).st_mode)
        assert os.get_blocking(fds[0]) and os.get_blocking(fds[1])
    finally:
        for fd in fds:
            os.close(fd)
    for field, open_it in [
        ("stdout", lambda: stdio.open_output("stdout", regular)),  # a plain path: a FIFO
        ("stdout", lambda: stdio.open_output("stdout", link)),
        ("stdin", lambda: stdio.open_input(link)),
        ("stdin", lambda: stdio.open_input(regular)),
        ("stdout", lambda: stdio.open_output("stdout", os.path.join(d, "missing"))),
        ("stderr", lambda: stdio.open_output("stderr", "file://" + link)),
    ]:
        _refused(field, open_it)
    # file:// creates the log file (and its directory).
    log = os.path.join(d, "logs", "c.log")
    os.close(stdio.open_output("stdout", "file://" + log))
    assert os.path.isfile(log)


# -- runtime options --------------------------------------------------------------------------


def test_options_of_unknown_type_refused() -> None:
    message = _refused("options", decode_options, "example.com/Evil", b"\x01")
    assert "example.com/Evil" in message


@pytest.mark.parametrize(
    ("options", "field"),
    [
        (runc_options_pb2.Options(binary_name="../runc"), "options.binary_name"),
        (runc_options_pb2.Options(binary_name="bin/runc"), "options.binary_name"),
        (runc_options_pb2.Options(binary_name="/usr/bin/../bin/runc"), "options.binary_name"),
        (runc_options_pb2.Options(binary_name="runc\0x"), "options.binary_name"),
        (runc_options_pb2.Options(root="relative"), "options.root"),
        (runc_options_pb2.Options(root="/run/../etc"), "options.root"),
        (runc_options_pb2.Options(criu_path="../criu"), "options.criu_path"),
        (runc_options_pb2.Options(criu_path="sbin/criu"), "options.criu_path"),
        (runc_options_pb2.Options(criu_path="/usr/sbin/./criu"), "options.criu_path"),
        (runc_options_pb2.Options(criu_work_path="work"), "options.criu_work_path"),
        (runc_options_pb2.Options(criu_work_path="/var/../etc"), "options.criu_work_path"),
    ],
)
def test_runc_options_refused(options: runc_options_pb2.Options, field: str) -> None:
    _refused(field, decode_options, RUNC_OPTIONS, options.SerializeToString())
    _refused("options", decode_options, RUNC_OPTIONS, b"\xff\xff\xff")


# -- rootfs mounts and exec specs -------------------------------------------------------------


@pytest.mark.parametrize(
    ("m", "ok"),
    [
        (Mount("overlay", "overlay", ("lowerdir=/a", "upperdir=/b", "workdir=/c")), True),
        (Mount("bind", "/var/lib/x", ("rbind", "ro")), True),
        (Mount("", "/x"), False),
        (Mount("Overlay;rm", "/x"), False),
        (Mount("bind", ""), False),
        (Mount("bind", "/x\0/y"), False),
        (Mount("bind", "/x", ("ro\0", "rw")), False),
        (Mount("bind", "/x", ("o" * 70_000,)), False),
    ],
)
def test_mount_descriptions(m: Mount, ok: bool) -> None:
    assert (m.problem() is None) == ok


def test_exec_spec_refused_without_a_stack_overflow() -> None:
    for value in (
        b"[" * 100_000,
        b'{"args": ' + b"[" * 100_000,
        b"not json",
        b"[]",
        b'{"args": []}',
    ):
        _refused("spec", parse_spec, value)
    assert parse_spec(b'{"args": ["true"]}') == b'{"args": ["true"]}'
