"""ExecSync: stdout, stderr and exit code, and the timeout that kills the command."""

from __future__ import annotations

import time

import grpc
import pytest

from integration.cri.node import CriNode


def test_exec_sync_returns_stdout_stderr_and_exit_code(node: CriNode, handler: str) -> None:
    pod = node.run_pod(handler)
    cid = node.run_container(pod, ["sleep", "1000"])
    r = node.exec_sync(cid, ["sh", "-c", "echo out; echo err >&2; echo more; exit 3"])
    assert (r.stdout, r.stderr, r.exit_code) == (b"out\nmore\n", b"err\n", 3)
    r = node.exec_sync(cid, ["cat", "/etc/hostname"])
    assert (r.stdout, r.stderr, r.exit_code) == (pod.config.hostname.encode() + b"\n", b"", 0)
    big = node.exec_sync(cid, ["sh", "-c", "seq 1 100000"])  # ~575 KB through the FIFO
    assert big.exit_code == 0
    assert big.stdout.decode().split() == [str(i) for i in range(1, 100001)]
    # a command that cannot be run: an error naming it, at once (a kubelet probe of a
    # missing binary must fail, not hang until its deadline)
    t = time.monotonic()
    with pytest.raises(grpc.RpcError) as exc:
        node.exec_sync(cid, ["/no/such/binary"])
    assert "no such file or directory" in (exc.value.details() or ""), exc.value
    assert time.monotonic() - t < 5
    # the container itself is untouched by its execs
    st = node.status(cid)
    assert st.state == 1 and st.finished_at == 0


def test_exec_sync_timeout_kills_the_command(node: CriNode, handler: str) -> None:
    pod = node.run_pod(handler)
    cid = node.run_container(pod, ["sleep", "1000"])
    t = time.monotonic()
    with pytest.raises(grpc.RpcError) as exc:
        node.exec_sync(cid, ["sleep", "77"], timeout=1)
    took = time.monotonic() - t
    assert "timeout" in (exc.value.details() or "")
    assert 1 <= took < 6, took
    # the timed-out command really died (critest: `pgrep sleep` finds only the container's)
    r = node.exec_sync(cid, ["sh", "-c", "ps -o pid,args | grep -c '[s]leep 77' || true"])
    assert r.stdout.strip() == b"0", r.stdout
    assert node.exec_sync(cid, ["true"]).exit_code == 0  # and the container still execs
