"""The daemon's open-file limit: raised to the hard limit for itself, the original soft limit
for every program it starts (runc, logging programs), and kept across a re-exec.

Each case runs in a child interpreter started under a low soft limit, so the test runner's
own limit and shim.util.limits' module state are left alone."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = str(Path(__file__).resolve().parents[1])

_CHILD = """
import json, os, resource, sys
sys.path.insert(0, {repo!r})
from shim.util import limits
from shim.io import logbinary
from shim.oci import runc

def nofile():
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]

def spawned_soft():
    # runc.spawn, as the daemon runs every runc command: fork+exec, its exit ours to reap
    r, w = os.pipe()
    pid = runc.spawn(["sh", "-c", "ulimit -Sn"], (0, w, 2), dict(os.environ), "/bin/sh")
    os.close(w)
    out = os.read(r, 100).decode().strip()
    os.waitpid(pid, 0)
    os.close(r)
    return out

def logging_program_soft():
    # logbinary's posix_spawn: the program writes to fd 3 (its stdout pipe)
    r, w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = logbinary._spawn(["/bin/sh", "-c", "ulimit -Sn >&3"], [w, w, ready_w], dict(os.environ))
    os.close(w)
    os.close(ready_w)
    out = os.read(r, 100).decode().strip()
    os.waitpid(pid, 0)
    return out

wrapped = []  # programs started through the shell
_wrap = limits.wrap
def counting_wrap(path, argv):
    wrapped.append(path)
    return _wrap(path, argv)
limits.wrap = counting_wrap

result = {{"before": nofile()}}
result["raised"] = limits.raise_nofile()
result["after"] = nofile()
result["child_soft"] = limits.child_soft()
result["runc"] = spawned_soft()
result["logging"] = logging_program_soft()
result["wrapped"] = len(wrapped)
result["reexec_env"] = limits.reexec_env({{}})
if os.environ.get("CROWDED"):
    # More descriptors open than the original limit allows: runc's spawn cannot make its
    # pipe under it, and goes through the shell.
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(limits.child_soft() + 8)]
    result["crowded_runc"] = spawned_soft()
    result["crowded_logging"] = logging_program_soft()
    result["crowded_wrapped"] = len(wrapped) - result["wrapped"]
    result["crowded_after"] = nofile()
print(json.dumps(result))
"""


def _run(soft: int, env: dict[str, str] | None = None) -> dict[str, object]:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    code = textwrap.dedent(_CHILD.format(repo=REPO))
    r = subprocess.run(
        ["/bin/sh", "-c", f'ulimit -Sn {soft} && exec "$@"', "sh", sys.executable, "-c", code],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    out: dict[str, object] = json.loads(r.stdout)
    assert out["after"] == hard
    return out


def test_raised_to_hard_and_children_get_the_original() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    out = _run(256)
    assert out["before"] == 256
    assert out["raised"] == {"soft": hard, "hard": hard, "children": 256}
    assert out["child_soft"] == 256
    assert out["runc"] == "256"
    assert out["logging"] == "256"
    assert out["wrapped"] == 0  # spawned under the lowered limit: no shell in between
    assert out["reexec_env"] == {"EMBEDSHIM_NOFILE_SOFT": "256"}


def test_more_open_than_the_original_allows_goes_through_the_shell() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    out = _run(256, {"CROWDED": "1"})
    assert out["crowded_runc"] == out["crowded_logging"] == "256"
    assert out["crowded_wrapped"] == 2
    assert out["crowded_after"] == hard


def test_nothing_raised_when_soft_is_hard() -> None:
    """containerd 1.6's unit (LimitNOFILE=infinity), or a containerd built with Go < 1.21:
    nothing to raise, and children start directly with the same limit."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    out = _run(hard)
    assert out["raised"] == {"soft": hard, "hard": hard}
    assert out["child_soft"] is None
    assert out["runc"] == out["logging"] == str(hard)
    assert out["reexec_env"] == {}


def test_reexec_keeps_the_original() -> None:
    """After a reload the new image starts raised: the original comes from the old image."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    out = _run(hard, {"EMBEDSHIM_NOFILE_SOFT": "300"})
    assert out["child_soft"] == 300
    assert out["runc"] == out["logging"] == "300"
    assert out["reexec_env"] == {"EMBEDSHIM_NOFILE_SOFT": "300"}


def test_wrap_leaves_argv_alone_when_not_raised() -> None:
    from shim.util import limits

    before = limits.child_soft()
    try:
        limits.set_child_soft(None)
        assert limits.wrap("/usr/sbin/runc", ["runc", "state", "x"]) == (
            "/usr/sbin/runc",
            ["runc", "state", "x"],
        )
        limits.set_child_soft(1024)
        path, argv = limits.wrap("/usr/sbin/runc", ["runc", "state", "a b'c"])
        assert path == "/bin/sh" and argv[3:] == ["1024", "/usr/sbin/runc", "state", "a b'c"]
        # arguments reach the program as they are, whatever they hold
        r = subprocess.run(
            limits.wrap("/bin/echo", ["echo", "a b'c", '"$x"', "-n"])[1],
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert r.stdout == 'a b\'c "$x" -n\n'
    finally:
        limits.set_child_soft(before)
