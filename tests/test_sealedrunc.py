"""The sealed copy runc runs from (shim/oci/sealedrunc.py): made only for runc, sealed as
runc requires, replaced with the binary, and what execute() starts."""

from __future__ import annotations

import asyncio
import fcntl
import os
import stat

import pytest

from shim.exits.reaper import Reaper
from shim.oci.runc import execute
from shim.oci.sealedrunc import NAME, SEALS, SealedCopies

# A program with runc's marker in it: a script, so that the test can see what the kernel ran
# (a script's interpreter gets the executed path as its first argument: "$0").
RUNC_LIKE = '#!/bin/sh\n# runc_cloned:/proc/self/exe\necho "$0" {version}\n'


def _program(tmp_path: os.PathLike[str], body: str, name: str = "runc") -> str:
    path = os.path.join(tmp_path, name)
    with open(path + ".new", "w") as f:
        f.write(body)
    os.chmod(path + ".new", 0o755)
    os.replace(path + ".new", path)  # a new inode, as a package upgrade makes
    return path


@pytest.fixture
def copies():
    c = SealedCopies()
    yield c
    c.close()


def test_runc_gets_a_sealed_copy_named_as_runc_names_its_own(tmp_path, copies):
    path = _program(tmp_path, RUNC_LIKE.format(version=1))
    assert copies.executable(path) == (path, True)  # none yet: from the disk, then make one
    copies.make(path)
    exe, make = copies.executable(path)
    assert not make and exe != path
    assert os.readlink(exe) == f"/memfd:{NAME} (deleted)"
    with open(exe, "rb") as f, open(path, "rb") as orig:
        assert f.read() == orig.read()
        assert fcntl.fcntl(f.fileno(), fcntl.F_GET_SEALS) & SEALS == SEALS
    # Sealed against writes: nobody, not even root, changes what runc runs.
    (fd,) = copies.fds()
    with pytest.raises(PermissionError):
        os.pwrite(fd, b"x", 0)
    with pytest.raises(PermissionError):
        os.ftruncate(fd, 1)
    # Close-on-exec: no program the daemon starts inherits it.
    assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC


def test_a_program_without_runcs_clone_code_runs_from_the_disk(tmp_path, copies):
    path = _program(tmp_path, "#!/bin/sh\necho crun\n", name="crun")
    copies.make(path)
    assert copies.executable(path) == (path, False)  # and not copied again at every command
    assert copies.fds() == []


def test_a_replaced_binary_gets_a_new_copy_and_the_old_one_goes(tmp_path, copies):
    path = _program(tmp_path, RUNC_LIKE.format(version=1))
    copies.make(path)
    (old,) = copies.fds()
    path = _program(tmp_path, RUNC_LIKE.format(version=2))
    assert copies.executable(path) == (path, True)  # the old copy is not run any more
    copies.make(path)
    (new,) = copies.fds()
    with open(copies.executable(path)[0]) as f:
        assert f.read().endswith(" 2\n")
    if new != old:
        with pytest.raises(OSError):
            os.fstat(old)
    else:  # the number was reused: it must be the new copy's
        assert stat.S_ISREG(os.fstat(new).st_mode)


def test_a_missing_binary_is_not_copied(tmp_path, copies):
    missing = os.path.join(tmp_path, "nothing")
    assert copies.executable(missing) == (missing, False)
    copies.make(missing)
    assert copies.fds() == []


def test_execute_runs_the_copy_once_it_exists(tmp_path, copies):
    """The first command runs from the disk and makes the copy; the next ones run the copy
    (what the kernel executed is the copy's /proc path), until the binary is replaced."""
    path = _program(tmp_path, RUNC_LIKE.format(version=1))
    env = {"PATH": str(tmp_path)}

    async def run() -> list[str]:
        reaper = Reaper(asyncio.get_running_loop())
        try:
            out = []
            for _ in range(2):
                status, output = await execute(reaper, ["runc"], env=env, copies=copies)
                assert status == 0
                out.append(output.decode())
            _program(tmp_path, RUNC_LIKE.format(version=2))
            for _ in range(2):
                status, output = await execute(reaper, ["runc"], env=env, copies=copies)
                out.append(output.decode())
            return out
        finally:
            reaper.close()

    first, second, replaced, after = asyncio.run(run())
    assert first == f"{path} 1\n"
    assert second.startswith(f"/proc/{os.getpid()}/fd/") and second.endswith(" 1\n")
    assert replaced == f"{path} 2\n"  # the new binary, from the disk, at once
    assert after.startswith(f"/proc/{os.getpid()}/fd/") and after.endswith(" 2\n")


def test_a_copy_that_cannot_be_made_is_not_tried_at_every_command(tmp_path, copies, monkeypatch):
    """No memfd here (a seccomp filter, an old kernel): runc runs from the disk, and the
    binary is not read again for every command, only once it changes."""
    path = _program(tmp_path, RUNC_LIKE.format(version=1))

    def refused(*args: object) -> int:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "memfd_create", refused)
    copies.make(path)
    assert copies.executable(path) == (path, False)
    assert copies.fds() == []
    path = _program(tmp_path, RUNC_LIKE.format(version=2))
    assert copies.executable(path) == (path, True)  # a new binary is tried again
