"""Exec and Attach through the streaming server, with and without a terminal.

CRI answers Exec/Attach with a URL of the kubelet streaming server inside containerd; the
client below speaks its WebSocket form (``v4.channel.k8s.io``, see wsstream.py), the same
server code path ``kubectl exec`` reaches through the kubelet (which speaks SPDY to it)."""

from __future__ import annotations

import time

from integration.cri import crilog
from integration.cri.api import cri_api_pb2 as cri
from integration.cri.node import CriNode
from integration.cri.wsstream import STDERR, STDOUT


def test_exec_stream(node: CriNode, handler: str) -> None:
    pod = node.run_pod(handler)
    cid = node.run_container(pod, ["sleep", "1000"])
    s = node.exec_stream(
        cid, ["sh", "-c", "echo out; echo err >&2; head -c 5; echo; exit 3"], stdin=True
    )
    try:
        s.wait_output(b"out\n")
        s.send_stdin(b"hello")
        s.wait_closed()
        assert s.buffers[STDOUT] == b"out\nhello\n"
        assert s.buffers[STDERR] == b"err\n"
        assert s.status()["reason"] == "NonZeroExitCode"
        assert s.exit_code() == 3
    finally:
        s.close()
    s = node.exec_stream(cid, ["true"])
    s.wait_closed()
    assert s.exit_code() == 0 and s.status()["status"] == "Success"
    s.close()


def test_exec_stream_tty(node: CriNode, handler: str) -> None:
    pod = node.run_pod(handler)
    cid = node.run_container(pod, ["sleep", "1000"])
    # Resize and stdin travel on separate channels, in no set order: after its line the
    # script waits (up to 5 s) for the new size instead of the test sleeping for it.
    script = (
        "[ -t 0 ] && [ -t 1 ] && echo TTY; read l; i=0; "
        'while [ "$(stty size)" != "30 100" ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done; '
        "stty size; echo got:$l; exit 4"
    )
    s = node.exec_stream(cid, ["sh", "-c", script], tty=True, stdin=True)
    try:
        s.wait_output(b"TTY")
        s.resize(100, 30)
        s.send_stdin(b"x\r")
        s.wait_closed()
        out = s.buffers[STDOUT]
        assert b"x\r\n" in out  # the terminal echoes input
        assert b"30 100\r\n" in out  # the resize reached the pty
        assert b"got:x\r\n" in out  # and the terminal turns \n into \r\n
        assert s.buffers.get(STDERR, b"") == b""  # a tty has one output stream
        assert s.exit_code() == 4
    finally:
        s.close()


def test_attach(node: CriNode, handler: str) -> None:
    """stdin_once: when the attach session ends the container's stdin closes (EOF)."""
    pod = node.run_pod(handler)
    cid = node.run_container(
        pod,
        ["sh", "-c", "read l; echo got:$l; echo warn >&2; cat; echo eof; exit 4"],
        name="attached",
        stdin=True,
        stdin_once=True,
    )
    s = node.attach_stream(cid)
    try:
        s.send_stdin(b"abc\n")
        s.wait_output(b"got:abc\n")
        s.wait_output(b"warn\n", channel=STDERR)
        s.send_stdin(b"line2\n")
        s.wait_output(b"line2\n")
    finally:
        s.close()
    st = node.wait_exited(cid, timeout=15)
    assert st.exit_code == 4  # cat saw EOF, so the script ran to its end
    records = crilog.parse(open(f"{pod.log_dir}/attached/0.log").read())
    assert crilog.lines(records, "stdout") == ["got:abc", "line2", "eof"]
    assert crilog.lines(records, "stderr") == ["warn"]


def test_attach_tty(node: CriNode, handler: str) -> None:
    pod = node.run_pod(handler)
    cid = node.run_container(pod, ["sh"], name="shell", tty=True, stdin=True)
    s = node.attach_stream(cid, tty=True)
    try:
        s.resize(120, 40)
        s.send_stdin(b"echo hi-$((40+2)); stty size\r")
        s.wait_output(b"hi-42\r\n")
        s.wait_output(b"40 120\r\n")
        s.send_stdin(b"exit 5\r")
        s.wait_closed()
    finally:
        s.close()
    st = node.wait_exited(cid, timeout=15)
    assert st.exit_code == 5
    assert st.state == cri.CONTAINER_EXITED


PORT = 8080
PREFIX = PORT.to_bytes(2, "little")


def _forward_once(node: CriNode, url: str) -> dict[int, bytes]:
    """One forwarded connection: send a line, return what came back on each channel."""
    s = node.stream(f"{url}?port={PORT}")
    try:
        s.wait_for(lambda: len(s.buffers.get(0, b"")) >= 2, what="the port prefix")
        s.send_stdin(b"ping\n")

        def answered() -> bool:
            got = s.buffers.get(0, b"")[2:]
            return b"\n" in got or len(s.buffers.get(1, b"")) > 2 or s.closed.is_set()

        s.wait_for(answered, what="an answer or an error")
        return dict(s.buffers)
    finally:
        s.close()


def test_port_forward(node: CriNode, handler: str) -> None:
    """PortForward: CRI connects to localhost:<port> in the pod's network namespace (the one
    the sandbox holds) and relays it on the WebSocket's channel 0 (data; 1 is errors), each
    channel's first message the port, little-endian."""
    pod = node.run_pod(handler)
    node.run_container(pod, ["sh", "-c", f"while :; do echo pong | nc -l -p {PORT}; done"])
    url = node.runtime.PortForward(cri.PortForwardRequest(pod_sandbox_id=pod.id, port=[PORT])).url
    for _ in range(50):  # until nc listens
        got = _forward_once(node, url)
        if got[0] != PREFIX:
            break
        time.sleep(0.1)
    assert got[0] == PREFIX + b"pong\n", got
