"""Checkpoint and restore through containerd's Tasks API and ctr, with runc and CRIU.

Where CRIU cannot run on the kernel (Debian's criu 3.17 fails `criu check` on Linux 6.18),
both RPCs must fail with FailedPrecondition and CRIU's own reason, and leave the container
running; where it can, a counting container is checkpointed, restored, and counts on.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

import grpc
import pytest

from integration.embed import RUNTIME, Events, bundle_dir, daemon_paths, run, start_daemon
from integration.harness import Containerd, task_list, wait_for
from shim.api import runc_options_pb2, shim_pb2
from shim.oci import piddir
from shim.ttrpc import Client, TTRPCError

TASKS = "/containerd.services.tasks.v1.Tasks/"
CHECKPOINT_MEDIA_TYPE = "application/vnd.containerd.container.criu.checkpoint.criu.tar"
COUNTER = "i=0; while true; do echo $i; i=$((i+1)); sleep 0.1; done"


def _criu_check() -> tuple[bool, str]:
    """Whether `criu check` passes here, and the first error it gives if not."""
    criu = shutil.which("criu")
    if criu is None:
        return False, "not installed"
    r = subprocess.run([criu, "check"], capture_output=True, text=True, timeout=30)
    errs = [
        re.sub(r"^Error \([^)]*\):\s*", "", ln.strip())
        for ln in (r.stdout + r.stderr).splitlines()
        if ln.strip().startswith("Error (")
    ]
    return r.returncode == 0, (errs[0] if errs else (r.stdout + r.stderr).strip())


CRIU_OK, CRIU_ERROR = _criu_check()
needs_broken_criu = pytest.mark.skipif(CRIU_OK, reason="CRIU works here: no error to see")
needs_criu = pytest.mark.skipif(not CRIU_OK, reason=f"`criu check` fails here: {CRIU_ERROR}")


def _tasks(c: Containerd, method: str, payload: bytes) -> bytes:
    """One call of containerd's Tasks API (raw bytes in and out)."""
    with grpc.insecure_channel(f"unix://{c.address}") as channel:
        call = channel.unary_unary(TASKS + method)
        out: bytes = call(payload, metadata=(("containerd-namespace", c.namespace),), timeout=60)
        return out


def _checkpoint_request(cid: str) -> bytes:
    """containerd.services.tasks.v1.CheckpointTaskRequest{container_id=1}: the same fields
    as the shim's CheckpointTaskRequest{id=1}."""
    return shim_pb2.CheckpointTaskRequest(id=cid).SerializeToString()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _bytes_field(num: int, value: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(value)) + value


def _create_from_checkpoint(cid: str, digest: str, size: int) -> bytes:
    """containerd.services.tasks.v1.CreateTaskRequest{container_id=1, checkpoint=8
    (Descriptor{media_type=1, digest=2, size=3})}."""
    desc = (
        _bytes_field(1, CHECKPOINT_MEDIA_TYPE.encode())
        + _bytes_field(2, digest.encode())
        + _varint(3 << 3)
        + _varint(size)
    )
    return _bytes_field(1, cid.encode()) + _bytes_field(8, desc)


def _counting(c: Containerd, busybox: str, cid: str) -> str:
    out = os.path.join(c.tmp, f"{cid}.log")
    c.run(RUNTIME, busybox, cid, "sh", "-c", COUNTER, detach=True,
          extra=("--log-uri", f"file://{out}"))  # fmt: skip
    wait_for(lambda: _last(out) >= 2, what=f"{cid} counting")
    return out


def _last(path: str) -> int:
    try:
        with open(path) as f:
            lines = f.read().split()
    except OSError:
        return -1
    return int(lines[-1]) if lines else -1


def _assert_criu_error(message: str, what: str) -> None:
    """``what`` (a regular expression) needs CRIU, with CRIU's reason from `criu check`."""
    assert re.search(f"{what} needs CRIU, which cannot run on this system: ", message), message
    assert "criu check` failed" in message and CRIU_ERROR in message, message


@needs_broken_criu
def test_checkpoint_fails_with_the_criu_reason_and_the_container_runs_on(
    containerd: Containerd, busybox: str
) -> None:
    out = _counting(containerd, busybox, "ck")
    with pytest.raises(grpc.RpcError) as info:
        _tasks(containerd, "Checkpoint", _checkpoint_request("ck"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    _assert_criu_error(info.value.details(), "checkpoint of ck")
    # Nothing was done to it: still running, still counting.
    assert task_list(containerd)["ck"][1] == "RUNNING"
    n = _last(out)
    wait_for(lambda: _last(out) > n + 2, what="counting on")
    # The runc shim's own options (as `ctr c checkpoint --task` sends them): the same answer.
    opts = runc_options_pb2.CheckpointOptions(exit=True, file_locks=True)
    req = shim_pb2.CheckpointTaskRequest(id="ck")
    req.options.type_url = "containerd.runc.v1.CheckpointOptions"
    req.options.value = opts.SerializeToString()
    with pytest.raises(grpc.RpcError) as info:
        _tasks(containerd, "Checkpoint", req.SerializeToString())
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert task_list(containerd)["ck"][1] == "RUNNING"  # exit=True did not stop it


def test_checkpoint_of_a_stopped_task_or_with_bad_options_is_refused(
    containerd: Containerd, busybox: str
) -> None:
    containerd.run(RUNTIME, busybox, "done", "true", detach=True)
    wait_for(lambda: task_list(containerd)["done"][1] == "STOPPED", what="stopped")
    with pytest.raises(grpc.RpcError) as info:
        _tasks(containerd, "Checkpoint", _checkpoint_request("done"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cannot checkpoint container done: it is stopped" in info.value.details()
    containerd.run(RUNTIME, busybox, "live", "sleep", "1000", detach=True)
    req = shim_pb2.CheckpointTaskRequest(id="live")
    req.options.type_url = "example.com/NotCheckpointOptions"
    with pytest.raises(grpc.RpcError) as info:
        _tasks(containerd, "Checkpoint", req.SerializeToString())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert task_list(containerd)["live"][1] == "RUNNING"


@needs_broken_criu
def test_create_from_checkpoint_fails_with_the_criu_reason(
    containerd: Containerd, busybox: str
) -> None:
    """containerd unpacks the checkpoint blob into a directory and asks us to create the
    task from it: refused before anything is created."""
    r = containerd.run(RUNTIME, busybox, "rs", "true", check=False)  # leaves the container
    assert r.returncode == 0, r.stderr
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = b"not a real CRIU image\n"
        ti = tarfile.TarInfo("inventory.img")
        ti.size = len(data)
        tar.addfile(ti, io.BytesIO(data))
    blob = buf.getvalue()
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    subprocess.run(
        containerd.ctr_argv("content", "ingest", "--expected-size", str(len(blob)),
                            "--expected-digest", digest, "ckpt-rs"),
        input=blob, check=True, capture_output=True, timeout=30, env=containerd.env,
    )  # fmt: skip
    with pytest.raises(grpc.RpcError) as info:
        _tasks(containerd, "Create", _create_from_checkpoint("rs", digest, len(blob)))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    _assert_criu_error(info.value.details(), "restore of rs from /[^ ]*ctrd-checkpoint[^ ]*")
    assert "rs" not in task_list(containerd)
    # The container is still usable without a checkpoint.
    r = containerd.ctr("task", "start", "rs", check=False)
    assert r.returncode == 0, r.stderr


def _checkpoint_with_ctr(c: Containerd, *args: str) -> subprocess.CompletedProcess[str]:
    """ctr pauses the task first, so this also goes through Pause and Resume."""
    return c.ctr(*args, check=False, timeout=120)


@needs_broken_criu
def test_ctr_task_checkpoint_says_why_and_the_task_resumes(
    containerd: Containerd, busybox: str
) -> None:
    out = _counting(containerd, busybox, "tc")
    r = _checkpoint_with_ctr(containerd, "task", "checkpoint", "tc")
    assert r.returncode != 0
    _assert_criu_error(r.stderr, "checkpoint of tc")
    assert "failed precondition" in r.stderr
    assert task_list(containerd)["tc"][1] == "RUNNING"  # ctr resumed it
    n = _last(out)
    wait_for(lambda: _last(out) > n + 2, what="counting on")


@needs_broken_criu
def test_ctr_container_checkpoint_task_says_why(containerd: Containerd, busybox_image: str) -> None:
    containerd.run(RUNTIME, busybox_image, "cc", "sleep", "1000", detach=True, image=True)
    r = _checkpoint_with_ctr(containerd, "container", "checkpoint", "--task", "cc", "cc-ckpt")
    assert r.returncode != 0
    _assert_criu_error(r.stderr, "checkpoint of cc")
    assert task_list(containerd)["cc"][1] == "RUNNING"
    assert "cc-ckpt" not in containerd.ctr("images", "ls", "-q").stdout.split()


@needs_criu
def test_checkpoint_and_restore_a_counting_container(
    containerd: Containerd, busybox_image: str
) -> None:
    """The real path: `ctr c checkpoint --task`, the container removed, `ctr c restore
    --live`, and it counts on from where it was (its output file is reopened by CRIU)."""
    out = os.path.join(containerd.tmp, "count.log")
    containerd.run(RUNTIME, busybox_image, "cnt", "sh", "-c", COUNTER, detach=True,
                   image=True, extra=("--log-uri", f"file://{out}"))  # fmt: skip
    wait_for(lambda: _last(out) >= 5, what="counting")
    r = _checkpoint_with_ctr(containerd, "container", "checkpoint", "--task", "--image",
                             "cnt", "cnt-ckpt")  # fmt: skip
    assert r.returncode == 0, r.stderr
    containerd.ctr("task", "kill", "-s", "KILL", "cnt")
    wait_for(lambda: task_list(containerd)["cnt"][1] == "STOPPED", what="stopped")
    at = _last(out)
    containerd.ctr("task", "delete", "cnt")
    containerd.ctr("container", "delete", "cnt")
    r = containerd.ctr("container", "restore", "--live", "cnt", "cnt-ckpt", check=False)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: _last(out) > at + 2, what="counting after restore")
    with open(out) as f:
        numbers = [int(x) for x in f.read().split()]
    assert numbers.count(0) == 1  # went on from the checkpoint, not from 0 again


# --- the real path, with stand-ins for CRIU (`criu check` passes) and for runc's two
# CRIU commands (the rest is real runc): what the daemon asks of them, and what follows ---

FAKE_RUNC = """#!/bin/sh
echo "$*" >> {log}
g=""
while [ $# -gt 0 ]; do
  case "$1" in
    --root|--log|--log-format|--criu) g="$g $1 $2"; shift 2 ;;
    --systemd-cgroup) g="$g $1"; shift ;;
    *) break ;;
  esac
done
cmd=$1; shift
case "$cmd" in
  checkpoint)
    leave=0
    while [ $# -gt 1 ]; do
      case "$1" in
        --image-path) image=$2; shift 2 ;;
        --work-path) work=$2; shift 2 ;;
        --leave-running) leave=1; shift ;;
        *) shift ;;
      esac
    done
    echo "dump log of $1" > "$work/dump.log"
    case "$image" in *fail*) echo "criu failed: type NOTIFY errno 0" >&2; exit 1 ;; esac
    echo image > "$image/inventory.img"
    [ $leave = 1 ] || exec {runc} $g kill "$1" KILL
    ;;
  restore)
    while [ $# -gt 1 ]; do
      case "$1" in
        --pid-file) pidfile=$2; shift 2 ;;
        --bundle) bundle=$2; shift 2 ;;
        *) shift ;;
      esac
    done
    {runc} $g create --bundle "$bundle" --pid-file "$pidfile" "$1" && exec {runc} $g start "$1"
    ;;
  *) exec {runc} $g "$cmd" "$@" ;;
esac
"""


def _stand_ins(c: Containerd) -> tuple[str, str, str]:
    """(runc wrapper, criu whose `check` passes, the wrapper's argv log)."""
    d = os.path.join(c.tmp, "standins")
    os.makedirs(d)
    log = os.path.join(d, "runc.argv")
    runc = os.path.join(d, "runc")
    with open(runc, "w") as f:
        f.write(FAKE_RUNC.format(log=log, runc=shutil.which("runc")))
    criu = os.path.join(d, "criu")
    with open(criu, "w") as f:
        f.write('#!/bin/sh\n[ "$1" = check ] && echo "Looks good." && exit 0\nexit 1\n')
    for p in (runc, criu):
        os.chmod(p, 0o755)
    return runc, criu, log


def _argv_lines(log: str, word: str) -> list[list[str]]:
    with open(log) as f:
        return [ln.split() for ln in f if f" {word} " in f" {ln} "]


def test_checkpoint_and_restore_drive_runc_and_criu_as_containerd_does(
    containerd: Containerd, busybox: str, events: Events
) -> None:
    runc, criu, argv_log = _stand_ins(containerd)
    opts = runc_options_pb2.Options(binary_name=runc, criu_path=criu)

    def bundle(cid: str) -> str:
        path = bundle_dir(containerd, "direct", cid)
        os.makedirs(path)
        spec = {
            "ociVersion": "1.0.2",
            "process": {"args": ["sleep", "100000"], "cwd": "/",
                        "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}},
            "root": {"path": busybox, "readonly": True},
            "linux": {"namespaces": [{"type": t} for t in ("pid", "mount", "ipc", "uts")],
                      "cgroupsPath": containerd.cgroup_path(cid)},
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        }  # fmt: skip
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(spec, f)
        return path

    def call(method: str, msg: object) -> bytes:
        async def go() -> bytes:
            async with await Client.connect(address) as client:
                return await client.call(
                    "containerd.task.v2.Task", method, msg.SerializeToString(),  # type: ignore[attr-defined]
                    metadata={"containerd-namespace-ttrpc": "direct"}, timeout=30,
                )  # fmt: skip

        return run(go())

    def create(cid: str, checkpoint: str = "") -> int:
        req = shim_pb2.CreateTaskRequest(id=cid, bundle=bundle(cid), checkpoint=checkpoint)
        req.options.type_url = "containerd.runc.v1.Options"
        req.options.value = opts.SerializeToString()
        return shim_pb2.CreateTaskResponse.FromString(call("Create", req)).pid

    def checkpoint(cid: str, image: str, **kw: object) -> None:
        req = shim_pb2.CheckpointTaskRequest(id=cid, path=image)
        if kw:
            req.options.type_url = "containerd.runc.v1.CheckpointOptions"
            req.options.value = runc_options_pb2.CheckpointOptions(**kw).SerializeToString()  # type: ignore[arg-type]
        call("Checkpoint", req)

    def state(cid: str) -> shim_pb2.StateResponse:
        return shim_pb2.StateResponse.FromString(call("State", shim_pb2.StateRequest(id=cid)))

    first = bundle("seed")
    address = start_daemon(containerd, first, "direct", "seed")  # run in its bundle
    assert create("c1") > 0
    call("Start", shim_pb2.StartRequest(id="c1"))
    b1 = bundle_dir(containerd, "direct", "c1")

    # Leave running: image and work paths as containerd's runc shim passes them.
    img1 = os.path.join(containerd.tmp, "img1")
    checkpoint("c1", img1)
    (argv,) = _argv_lines(argv_log, "checkpoint")
    assert argv[argv.index("--criu") + 1] == criu
    i = argv.index("checkpoint")
    assert argv[i:] == ["checkpoint", "--image-path", img1, "--work-path",
                        os.path.join(b1, "criu-work"), "--leave-running", "c1"]  # fmt: skip
    assert os.path.exists(os.path.join(img1, "inventory.img"))
    assert not os.path.exists(os.path.join(b1, "criu-work"))  # ours: removed after
    assert state("c1").status == 2  # RUNNING
    ev = wait_for(lambda: events.payloads("/tasks/checkpointed", "c1"), what="checkpointed")
    assert f'"checkpoint":"{img1}"' in ev[0]

    # A failing dump: runc's error, CRIU's log kept beside the bundle, still running.
    with pytest.raises(TTRPCError) as info:
        checkpoint("c1", os.path.join(containerd.tmp, "img-fail"))
    assert "criu failed: type NOTIFY errno 0" in info.value.message
    assert f"CRIU log: {os.path.join(b1, 'criu-dump.log')}" in info.value.message
    with open(os.path.join(b1, "criu-dump.log")) as f:
        assert f.read() == "dump log of c1\n"
    assert state("c1").status == 2

    # exit=True, the caller's own image and work paths: the container is stopped by the dump.
    img2, work2 = os.path.join(containerd.tmp, "img2"), os.path.join(containerd.tmp, "work2")
    checkpoint("c1", "/unused", exit=True, image_path=img2, work_path=work2, file_locks=True)
    argv = _argv_lines(argv_log, "checkpoint")[-1]
    i = argv.index("checkpoint")
    assert argv[i:] == ["checkpoint", "--image-path", img2, "--work-path", work2,
                        "--file-locks", "c1"]  # fmt: skip
    assert os.path.exists(os.path.join(work2, "dump.log"))  # the caller's: kept
    assert events.exit_status("c1") == 137
    call("Delete", shim_pb2.DeleteRequest(id="c1"))

    # Create from the checkpoint: nothing runs until Start, which restores.
    assert create("c2", checkpoint=img2) == 0
    assert state("c2").status == 1  # CREATED
    assert _argv_lines(argv_log, "restore") == []
    created = wait_for(lambda: events.payloads("/tasks/create", "c2"), what="create event")
    assert f'"checkpoint":"{img2}"' in created[0]
    pid = shim_pb2.StartResponse.FromString(call("Start", shim_pb2.StartRequest(id="c2"))).pid
    assert pid > 0 and state("c2").status == 2 and state("c2").pid == pid
    b2 = bundle_dir(containerd, "direct", "c2")
    (argv,) = _argv_lines(argv_log, "restore")
    i = argv.index("restore")
    assert argv[i:] == ["restore", "--detach", "--image-path", img2, "--work-path",
                        os.path.join(b2, "criu-work"), "--pid-file",
                        os.path.join(piddir.path_for(daemon_paths(containerd).dir),
                                     "direct+c2+init.pid"),
                        "--no-subreaper", "--bundle", b2,
                        "c2"]  # fmt: skip
    wait_for(lambda: events.payloads("/tasks/start", "c2"), what="start event")
    # The restored init is watched like any other.
    call("Kill", shim_pb2.KillRequest(id="c2", signal=9))
    assert events.exit_status("c2") == 137
    call("Delete", shim_pb2.DeleteRequest(id="c2"))


def test_check_shows_whether_criu_works_and_why_not() -> None:
    """`containerd-shim-embed-v1 check` runs `criu check` as the daemon does, and shows
    CRIU's own first reason when it fails."""
    exe = os.path.join(sys.prefix, "bin", "containerd-shim-embed-v1")
    out = subprocess.run([exe, "check"], capture_output=True, text=True, check=True).stdout
    (row,) = [ln for ln in out.splitlines() if ln.startswith("checkpoint (CRIU)")]
    assert row.split()[2] == ("yes" if CRIU_OK else "no"), row
    if shutil.which("criu") is None:
        assert "criu not on PATH" in row, row
    elif not CRIU_OK:
        assert CRIU_ERROR in row, (CRIU_ERROR, row)
