"""Who may talk to the daemon, and what it refuses before runc or the filesystem sees it.

Each test runs a real daemon (through ``start``, as containerd would) with one container
running beside the hostile input, and checks that container is untouched afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from integration.embed import (
    SHIM,
    bundle_dir,
    call,
    daemon_paths,
    daemons,
    embedshim_env,
    oci_spec,
    remove_host_leftovers,
    run,
    shim_command,
    start_daemon,
    write_bundle,
)
from integration.harness import Containerd, mounts_under, wait_for
from shim.api import runc_options_pb2, shim_pb2
from shim.ttrpc import Code, TTRPCError
from shim.ttrpc.codec import (
    HEADER_SIZE,
    FrameHeader,
    MessageType,
    Request,
    Response,
    encode_frame,
)

NS = "direct"
DAEMON_SERVICE = "embedshim.v1.Daemon"


@dataclass
class Live:
    """A daemon serving ``containerd``, with one created container ``keep`` (pid)."""

    c: Containerd
    busybox: str
    address: str
    pid: int

    def refused(self, method: str, msg: object, ns: str | None = NS, **kw: object) -> TTRPCError:
        with pytest.raises(TTRPCError) as info:
            run(call(self.address, method, msg, ns, **kw))  # type: ignore[arg-type]
        return info.value

    def invalid(
        self, field: str, method: str, msg: object, ns: str | None = NS, **kw: object
    ) -> str:
        err = self.refused(method, msg, ns, **kw)
        assert err.code == Code.INVALID_ARGUMENT, err
        assert err.message.startswith(field + ":"), err.message
        return err.message

    def keep_is_untouched(self) -> None:
        state = shim_pb2.StateResponse.FromString(
            run(call(self.address, "State", shim_pb2.StateRequest(id="keep"), NS))
        )
        assert (state.pid, state.status) == (self.pid, 1)  # still CREATED, same process
        (daemon,) = daemons(self.c)
        assert daemon.pid == self.daemon_pid

    @property
    def daemon_pid(self) -> int:
        with open(daemon_paths(self.c).pidfile) as f:
            return int(f.read())

    def runc_ids(self) -> list[str]:
        root = daemon_paths(self.c).runc_root_for(NS)
        return sorted(os.listdir(root)) if os.path.isdir(root) else []


@pytest.fixture
def live(containerd: Containerd, busybox: str) -> Iterator[Live]:
    bundle = write_bundle(containerd, NS, "keep", oci_spec(busybox, "sleep", "1000"))
    address = start_daemon(containerd, bundle, NS, "keep")
    created = run(call(address, "Create", shim_pb2.CreateTaskRequest(id="keep", bundle=bundle)))
    pid = shim_pb2.CreateTaskResponse.FromString(created).pid
    lv = Live(containerd, busybox, address, pid)
    yield lv
    lv.keep_is_untouched()
    run(call(address, "Kill", shim_pb2.KillRequest(id="keep", signal=9)))
    wait = shim_pb2.WaitResponse.FromString(
        run(call(address, "Wait", shim_pb2.WaitRequest(id="keep")))
    )
    assert wait.exit_status == 137
    run(call(address, "Delete", shim_pb2.DeleteRequest(id="keep")))


# -- who may connect ------------------------------------------------------------------------

# Runs as root, imports everything, then becomes nobody (keeping CAP_DAC_OVERRIDE in "dac"
# mode: the only way past the socket's file permissions), connects and asks for Info.
_CHILD = r"""
import ctypes, os, socket, struct, sys
path, mode = sys.argv[1], sys.argv[2]
libc = ctypes.CDLL(None, use_errno=True)
if mode == "dac":
    libc.prctl(8, 1, 0, 0, 0)  # PR_SET_KEEPCAPS: permitted caps survive setuid
os.setgroups([])
os.setgid(65534)
if mode != "gid":  # "gid": still uid 0 (and every capability), only the gid differs
    os.setuid(65534)
if mode == "dac":
    cap = 1 << 1  # CAP_DAC_OVERRIDE
    header = ctypes.create_string_buffer(struct.pack("Ii", 0x20080522, 0))
    data = ctypes.create_string_buffer(struct.pack("IIIIII", cap, cap, 0, 0, 0, 0))
    if libc.capset(header, data) != 0:
        print("capset failed", ctypes.get_errno()); sys.exit(3)
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(path)
except PermissionError:
    print("EACCES"); sys.exit(0)
req = b"\n\x13embedshim.v1.Daemon\x12\x04Info"
s.settimeout(5)
try:
    s.sendall(struct.pack(">IIBB", len(req), 1, 1, 0) + req)
    data = s.recv(4096)
except (BrokenPipeError, ConnectionResetError):
    data = b""  # dropped before (or while) we asked
print("answered" if data else "dropped")
"""


def _as_nobody(socket_path: str, mode: str) -> str:
    r = subprocess.run(
        [sys.executable, "-c", _CHILD, socket_path, mode],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_only_root_may_talk_to_the_daemon(live: Live) -> None:
    paths = daemon_paths(live.c)
    st = os.stat(paths.socket)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    st = os.stat(paths.dir)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == 0
    # An unprivileged process cannot even connect: the file permissions stop it.
    assert _as_nobody(paths.socket, "plain") == "EACCES"
    # One that gets past them (CAP_DAC_OVERRIDE) is dropped on its SO_PEERCRED, and logged.
    assert _as_nobody(paths.socket, "dac") == "dropped"
    # So is root with another group: the gid must match too.
    assert _as_nobody(paths.socket, "gid") == "dropped"
    with open(paths.log) as f:
        lines = [ln for ln in f if "connection refused" in ln]
    assert len(lines) == 2, lines
    assert {"uid=65534", "gid=65534"} <= set(lines[0].split()), lines
    assert {"uid=0", "gid=65534"} <= set(lines[1].split()), lines
    # Root is still served, by the same daemon.
    info = run(call(live.address, "Info", b"", None, service=DAEMON_SERVICE))
    assert b'"pid"' in info


# -- ids ------------------------------------------------------------------------------------

BAD_IDS = ["../x", "/abs/path", "a\0b", "x" * 10_000, "", "a/../../b", "..", "sp ace"]


@pytest.mark.parametrize(
    "bad", BAD_IDS, ids=["dotdot", "abs", "nul", "10k", "empty", "slash", "dots", "space"]
)
def test_bad_ids_refused_everywhere(live: Live, bad: str) -> None:
    good = bundle_dir(live.c, NS, "keep")
    live.invalid("id", "Create", shim_pb2.CreateTaskRequest(id=bad, bundle=good))
    # The namespace header is checked like an id.
    create = shim_pb2.CreateTaskRequest(id="fresh", bundle=good)
    if bad:
        live.invalid("namespace", "Create", create, ns=bad)
    # Exec ids.
    spec = shim_pb2.ExecProcessRequest(id="keep", exec_id=bad)
    spec.spec.value = b'{"args": ["true"]}'
    live.invalid("exec_id", "Exec", spec)
    # The daemon's own service (start's Reserve, delete's Cleanup).
    for method in ("Reserve", "Cleanup"):
        live.invalid("id", method, f"{NS}\0{bad}".encode(), None, service=DAEMON_SERVICE)
        if bad and "\0" not in bad:  # a NUL would split the payload elsewhere
            live.invalid("namespace", method, f"{bad}\0x".encode(), None, service=DAEMON_SERVICE)
    # Lookups by a bad id find nothing (they never reach runc or a path).
    for method, msg in [
        ("State", shim_pb2.StateRequest(id=bad)),
        ("Kill", shim_pb2.KillRequest(id=bad, signal=9)),
        ("Delete", shim_pb2.DeleteRequest(id=bad)),
    ]:
        assert live.refused(method, msg).code == Code.NOT_FOUND
    assert live.runc_ids() == ["keep"]
    assert sorted(os.listdir(os.path.dirname(good))) == ["keep"]


def test_subcommands_refuse_bad_ids(live: Live, tmp_path: object) -> None:
    cwd = str(tmp_path)
    env = {**live.c.env, "TTRPC_ADDRESS": live.c.ttrpc_address}
    exe = os.path.join(sys.prefix, "bin", SHIM)
    for flag, bad in [("-id", "../../etc"), ("-namespace", "a/b"), ("-id", "x" * 10_000)]:
        flags = {"-namespace": NS, "-id": "ok", flag: bad}
        argv = [exe, "-address", live.c.address, *[a for kv in flags.items() for a in kv]]
        r = subprocess.run(
            [*argv, "start"], cwd=cwd, env=env, capture_output=True, text=True, timeout=30
        )
        assert r.returncode == 1 and flag[1:] + ":" in r.stdout, r
        assert os.listdir(cwd) == []  # no address file written
        r = subprocess.run(
            [*argv, "delete"], cwd=cwd, env=env, capture_output=True, text=True, timeout=30
        )
        assert r.returncode == 1 and flag[1:] + ":" in r.stderr, r
        assert r.stdout == ""


# -- bundles, stdio, options ----------------------------------------------------------------


def test_bundles_outside_containerd_state_refused(live: Live) -> None:
    c, spec = live.c, oci_spec(live.busybox, "true")
    # A bundle-shaped directory outside the allowed state directory.
    outside = os.path.join(c.tmp, "elsewhere", "io.containerd.runtime.v2.task", NS, "b1")
    os.makedirs(outside)
    with open(os.path.join(outside, "config.json"), "w") as f:
        f.write("{}")
    message = live.invalid("bundle", "Create", shim_pb2.CreateTaskRequest(id="b1", bundle=outside))
    assert f"({c.state};" in message and "EMBEDSHIM_BUNDLE_ROOTS" in message
    # The right place, but a symbolic link to the directory above.
    link = bundle_dir(c, NS, "b2")
    os.symlink(outside, link)
    message = live.invalid("bundle", "Create", shim_pb2.CreateTaskRequest(id="b2", bundle=link))
    assert "symbolic link" in message
    # Not clean, or naming another task.
    b3 = write_bundle(c, NS, "b3", spec)
    for path in (b3 + "/", b3 + "/../b3", "relative/b3", bundle_dir(c, NS, "keep")):
        live.invalid("bundle", "Create", shim_pb2.CreateTaskRequest(id="b3", bundle=path))
    # rootfs a symbolic link: mounting there would mount on the link's target.
    target = os.path.join(c.tmp, "target")
    os.makedirs(target)
    os.symlink(target, os.path.join(b3, "rootfs"))
    req = shim_pb2.CreateTaskRequest(id="b3", bundle=b3)
    req.rootfs.add(type="bind", source=live.busybox, options=["rbind", "ro"])
    live.invalid("bundle", "Create", req)
    assert mounts_under(c.tmp) == [] and os.listdir(target) == []
    assert live.runc_ids() == ["keep"]


def _info(address: str) -> dict[str, object]:
    out = run(call(address, "Info", b"", None, service=DAEMON_SERVICE))
    info: dict[str, object] = json.loads(out)
    return info


def _environ(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return f.read().split(b"\0")


def test_state_directory_learned_from_the_bundle(live: Live, busybox: str) -> None:
    """No setting anywhere: the daemon of a containerd whose state is not /run/containerd
    takes its bundles (``start`` told it where, from the bundle it ran in), refuses those of
    any other state directory, and keeps doing both after a reload."""
    c = live.c
    (daemon,) = daemons(c)
    assert c.state != "/run/containerd"
    assert daemon.cmdline[daemon.cmdline.index("-containerd-state") + 1] == c.state
    assert not [v for v in _environ(daemon.pid) if v.startswith(b"EMBEDSHIM_BUNDLE_ROOTS=")]
    assert _info(live.address)["bundle_roots"] == [c.state]
    spec = oci_spec(busybox, "true")

    def refused_elsewhere() -> None:
        # containerd's default state directory (nothing made there: refused before the
        # filesystem is looked at) ...
        default = os.path.join("/run/containerd", "io.containerd.runtime.v2.task", NS, "o1")
        message = live.invalid(
            "bundle", "Create", shim_pb2.CreateTaskRequest(id="o1", bundle=default)
        )
        assert c.state in message and "EMBEDSHIM_BUNDLE_ROOTS" in message
        # ... and a real bundle of another containerd.
        message = live.invalid(
            "bundle", "Create", shim_pb2.CreateTaskRequest(id="o1", bundle=other_bundle)
        )
        assert c.state in message
        assert live.runc_ids() == ["keep"]

    # It runs no container: without watch_paths its clean-up leaves live's (same rootfs) alone.
    other = Containerd(extra_env=embedshim_env())
    try:
        other_bundle = write_bundle(other, NS, "o1", spec)
        refused_elsewhere()
        # EMBEDSHIM_BUNDLE_ROOTS is the override: the other containerd's daemon, told to take
        # bundles from ours only, refuses its own.
        own = write_bundle(other, NS, "o2", spec)
        address = start_daemon(other, own, NS, "o2", env={"EMBEDSHIM_BUNDLE_ROOTS": c.state})
        assert _info(address)["bundle_roots"] == [c.state]
        with pytest.raises(TTRPCError) as info:
            run(call(address, "Create", shim_pb2.CreateTaskRequest(id="o2", bundle=own), NS))
        assert info.value.code == Code.INVALID_ARGUMENT, info.value
        assert info.value.message.startswith("bundle:") and c.state in info.value.message

        # A reload re-executes the daemon with the same command line: same state directory.
        r = shim_command(c, "reload")
        assert r.returncode == 0, r.stderr
        assert _info(live.address)["bundle_roots"] == [c.state]
        refused_elsewhere()
        ok = write_bundle(c, NS, "ok", spec)
        run(call(live.address, "Create", shim_pb2.CreateTaskRequest(id="ok", bundle=ok)))
        run(call(live.address, "Delete", shim_pb2.DeleteRequest(id="ok")))
    finally:
        try:
            other.cleanup()
        finally:
            remove_host_leftovers(other)


def test_daemon_restarted_with_its_own_command_line(containerd: Containerd, busybox: str) -> None:
    """The daemon's command line carries what ``start`` learned: run again as it stands (by
    hand or a supervisor: no readiness pipe), it serves the same containerd's bundles."""
    c = containerd
    first = write_bundle(c, NS, "r1", oci_spec(busybox, "true"))
    address = start_daemon(c, first, NS, "r1")
    (daemon,) = daemons(c)
    argv, env = daemon.cmdline, [v for v in _environ(daemon.pid) if v]
    assert "-ready-fd" in argv and "-containerd-state" in argv
    os.kill(daemon.pid, signal.SIGTERM)
    wait_for(lambda: not daemons(c), 10, what="daemon gone")
    proc = subprocess.Popen(
        argv,
        env=dict(v.decode().split("=", 1) for v in env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(lambda: _answers(address), 15, what="restarted daemon answers")
        assert _info(address)["bundle_roots"] == [c.state]
        created = run(call(address, "Create", shim_pb2.CreateTaskRequest(id="r1", bundle=first)))
        assert shim_pb2.CreateTaskResponse.FromString(created).pid > 0
        run(call(address, "Delete", shim_pb2.DeleteRequest(id="r1")))
        with open(daemon_paths(c).log) as f:
            assert "no readiness pipe to signal" in f.read()
    finally:
        proc.terminate()
        proc.wait(15)


def _answers(address: str) -> bool:
    try:
        _info(address)
    except (OSError, TTRPCError):
        return False
    return True


def test_stdio_and_options_refused(live: Live) -> None:
    c = live.c
    b = write_bundle(c, NS, "s1", oci_spec(live.busybox, "true"))
    victim = os.path.join(c.tmp, "victim")
    with open(victim, "w") as f:
        f.write("precious\n")
    os.symlink(victim, os.path.join(c.tmp, "link"))
    for field, uri in [
        ("stdout", "../../victim"),
        ("stdout", victim),  # a plain path must be a FIFO
        ("stdout", "file://" + os.path.join(c.tmp, "link")),  # never through a link
        ("stderr", "tcp://127.0.0.1:1"),
        ("stdin", "file://" + victim),
        ("stdin", "/no\0where"),
    ]:
        live.invalid(field, "Create", shim_pb2.CreateTaskRequest(id="s1", bundle=b, **{field: uri}))
    with open(victim) as f:
        assert f.read() == "precious\n"
    req = shim_pb2.CreateTaskRequest(id="s1", bundle=b)
    req.options.type_url = "example.com/evil.Options"
    live.invalid("options", "Create", req)
    req.options.type_url = "containerd.runc.v1.Options"
    req.options.value = runc_options_pb2.Options(binary_name="../../bin/sh").SerializeToString()
    live.invalid("options.binary_name", "Create", req)
    req.options.value = runc_options_pb2.Options(binary_name="/no/such/runc").SerializeToString()
    message = live.invalid("options.binary_name", "Create", req)
    assert "not found" in message
    req.options.value = runc_options_pb2.Options(root="run/../x").SerializeToString()
    live.invalid("options.root", "Create", req)
    req = shim_pb2.CreateTaskRequest(id="s1", bundle=b)
    req.rootfs.add(type="bind", source=live.busybox, options=["rbind"])
    req.rootfs.add(type="evil;type", source="/")
    live.invalid("rootfs[1]", "Create", req)
    assert mounts_under(c.tmp) == []
    # An exec spec nested deep enough to overflow a parser's stack.
    ex = shim_pb2.ExecProcessRequest(id="keep", exec_id="deep")
    ex.spec.value = b'{"args": ' + b"[" * 200_000
    live.invalid("spec", "Exec", ex)
    assert live.runc_ids() == ["keep"]
    assert sorted(os.listdir(b)) == ["config.json"]


def test_too_many_rootfs_mounts_refused(live: Live) -> None:
    b = write_bundle(live.c, NS, "m1", oci_spec(live.busybox, "true"))
    req = shim_pb2.CreateTaskRequest(id="m1", bundle=b)
    for _ in range(129):
        req.rootfs.add(type="bind", source=live.busybox, options=["rbind"])
    message = live.invalid("rootfs", "Create", req)
    assert "129 mounts, more than 128" in message, message
    assert mounts_under(live.c.tmp) == []
    del req.rootfs[128:]  # 128 is allowed (each is checked, none made before all are)
    req.rootfs[127].type = "bad;type"
    live.invalid("rootfs[127]", "Create", req)
    assert mounts_under(live.c.tmp) == []


def test_restore_paths_checked(live: Live) -> None:
    """A checkpoint to restore from must be a clean absolute path to a directory (the criu
    gate is a fake criu that passes `criu check`, so the path checks are reached)."""
    c = live.c
    criu = os.path.join(c.tmp, "fake-criu")
    with open(criu, "w") as f:
        f.write('#!/bin/sh\n[ "$1" = check ] && echo "Looks good." && exit 0\nexit 1\n')
    os.chmod(criu, 0o755)
    b = write_bundle(c, NS, "r1", oci_spec(live.busybox, "true"))
    not_a_dir = os.path.join(c.tmp, "file")
    open(not_a_dir, "w").close()

    def create(**fields: str) -> shim_pb2.CreateTaskRequest:
        req = shim_pb2.CreateTaskRequest(id="r1", bundle=b, **fields)  # type: ignore[arg-type]
        req.options.type_url = "containerd.runc.v1.Options"
        req.options.value = runc_options_pb2.Options(criu_path=criu).SerializeToString()
        return req

    for bad in ("relative/ckpt", c.tmp + "/../ckpt", not_a_dir, "/no/such/dir"):
        live.invalid("checkpoint", "Create", create(checkpoint=bad))
    live.invalid("parent_checkpoint", "Create", create(checkpoint=c.tmp, parent_checkpoint="a/b"))
    assert live.runc_ids() == ["keep"]
    assert sorted(os.listdir(b)) == ["config.json"]


def test_systemd_cgroup_option_reaches_runc(live: Live) -> None:
    """Options.SystemdCgroup becomes runc's --systemd-cgroup (a recording runc wrapper; the
    real runc runs without it, there being no systemd here)."""
    c = live.c
    argv_log = os.path.join(c.tmp, "runc-argv")
    fake = os.path.join(c.tmp, "recording-runc")
    with open(fake, "w") as f:
        f.write(
            "#!/bin/sh\n"
            f'echo "$*" >> {argv_log}\n'
            'for a; do shift; [ "$a" = --systemd-cgroup ] || set -- "$@" "$a"; done\n'
            'exec runc "$@"\n'
        )
    os.chmod(fake, 0o755)
    for cid, systemd in (("sd1", True), ("sd0", False)):
        b = write_bundle(c, NS, cid, oci_spec(live.busybox, "sleep", "1000"))
        req = shim_pb2.CreateTaskRequest(id=cid, bundle=b)
        req.options.type_url = "containerd.runc.v1.Options"
        req.options.value = runc_options_pb2.Options(
            binary_name=fake, systemd_cgroup=systemd
        ).SerializeToString()
        run(call(live.address, "Create", req))
        run(call(live.address, "Kill", shim_pb2.KillRequest(id=cid, signal=9)))
        run(call(live.address, "Wait", shim_pb2.WaitRequest(id=cid)))
        run(call(live.address, "Delete", shim_pb2.DeleteRequest(id=cid)))
    with open(argv_log) as f:
        calls = [ln.split() for ln in f.read().splitlines()]
    for cid, systemd in (("sd1", True), ("sd0", False)):
        mine = [a for a in calls if cid in a]  # create, kill, delete, ... of that one
        assert any("create" in a for a in mine), calls
        assert all(("--systemd-cgroup" in a) == systemd for a in mine), mine


def _request(stream: int, method: str, msg: object) -> bytes:
    payload = msg.SerializeToString()  # type: ignore[attr-defined]
    request = Request(
        "containerd.task.v2.Task", method, payload, metadata=(("containerd-namespace-ttrpc", NS),)
    )
    return encode_frame(stream, MessageType.REQUEST, request.encode())


def _responses(s: socket.socket, n: int) -> list[tuple[int, Response]]:
    """The next ``n`` responses on ``s`` (stream id, response), in the order they came."""
    out = []
    for _ in range(n):
        header = FrameHeader.decode(_exactly(s, HEADER_SIZE))
        out.append((header.stream_id, Response.decode(_exactly(s, header.length))))
    return out


def _exactly(s: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return bytes(data)


def _padded(msg: object, size: int) -> object:
    """``msg`` serialized with an unknown length-delimited field (15) bringing it to about
    ``size`` bytes: still a valid request, and as large as the peer likes."""
    body = msg.SerializeToString()  # type: ignore[attr-defined]
    pad = size - len(body) - 8
    varint = bytearray()
    n = pad
    while True:
        varint.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            break

    class Raw:
        def SerializeToString(self) -> bytes:  # noqa: N802 (protobuf's name)
            return body + b"\x7a" + bytes(varint) + b"\0" * pad

    return Raw()


@pytest.mark.parametrize(
    "bound, under, over, size",
    [("128 requests", 127, 128, 0), ("16 MiB", 4, 5, 3_500_000)],
)
def test_a_peer_is_not_read_past_its_in_flight_bound(
    live: Live, bound: str, under: int, over: int, size: int
) -> None:
    """The real defaults, 128 requests or 16 MiB of them in flight on one connection: under
    the bound the next request is read and answered at once; at it, the next one is not read
    until a Wait answers, while other connections are served as usual."""
    c = live.c
    b = write_bundle(c, NS, "hold", oci_spec(live.busybox, "sleep", "1000"))
    run(call(live.address, "Create", shim_pb2.CreateTaskRequest(id="hold", bundle=b)))
    wait = shim_pb2.WaitRequest(id="hold")
    big_wait = _padded(wait, size) if size else wait
    state = shim_pb2.StateRequest(id="hold")
    conns = []
    try:
        for n in (under, over):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(daemon_paths(c).socket)
            conns.append(s)
            s.sendall(b"".join(_request(2 * i + 1, "Wait", big_wait) for i in range(n)))
            s.sendall(_request(2 * n + 1, "State", state))
        # Under the bound: the State is answered while every Wait still waits.
        conns[0].settimeout(10)
        t0 = time.monotonic()
        [(stream, response)] = _responses(conns[0], 1)
        took = time.monotonic() - t0
        assert stream == 2 * under + 1 and response.status.ok
        # At it: nothing comes back, though other connections are answered.
        conns[1].settimeout(10 * took + 1)
        with pytest.raises(TimeoutError):
            conns[1].recv(1)
        live.keep_is_untouched()
        run(call(live.address, "Kill", shim_pb2.KillRequest(id="hold", signal=9)))
        conns[1].settimeout(30)
        got = _responses(conns[1], over + 1)
        assert {sid for sid, _ in got[:over]} == {2 * i + 1 for i in range(over)}
        assert got[over][0] == 2 * over + 1 and got[over][1].status.ok  # read only then
        for _, response in got[:over]:
            assert shim_pb2.WaitResponse.FromString(response.payload).exit_status == 137
    finally:
        for s in conns:
            s.close()
    run(call(live.address, "Delete", shim_pb2.DeleteRequest(id="hold")))


def test_a_peer_that_does_not_read_its_answers_is_not_read_either(live: Live) -> None:
    """A peer that sends and never reads: once its answers back up, the daemon stops reading
    it, so its requests wait in its own socket, not in the daemon's memory; others are
    served as usual meanwhile."""
    (daemon,) = daemons(live.c)

    def rss() -> int:
        with open(f"/proc/{daemon.pid}/status") as f:
            return int(next(ln for ln in f if ln.startswith("VmRSS:")).split()[1])

    before = rss()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(daemon_paths(live.c).socket)
    s.setblocking(False)
    frames = b"".join(_request(2 * i + 1, "State", shim_pb2.StateRequest(id="keep"))
                      for i in range(2000))  # fmt: skip
    sent, stalled_since = 0, None
    try:
        while sent < 200 * len(frames):  # up to about 20 MB of requests
            try:
                sent += s.send(frames[sent % len(frames) :][:65536])
                stalled_since = None
            except BlockingIOError:
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 1.0:
                    break  # the daemon has stopped reading us
                time.sleep(0.01)
        assert sent < 200 * len(frames), "the daemon read everything a non-reader sent"
        t0 = time.monotonic()
        live.keep_is_untouched()
        assert time.monotonic() - t0 < 1.0
        assert rss() - before < 8 << 10, (before, rss())  # KiB: bounded, not ~20 MB
    finally:
        s.close()
    live.keep_is_untouched()
