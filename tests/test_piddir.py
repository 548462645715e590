"""The daemon's pid directory on tmpfs (shim/oci/piddir.py): used only when it is safely
ours, its names per process, and its clean-up."""

from __future__ import annotations

import os
import stat

import pytest

from shim.oci import piddir


@pytest.fixture
def shm(tmp_path):
    """A stand-in for /dev/shm: root's, world-writable, sticky."""
    d = tmp_path / "shm"
    d.mkdir()
    d.chmod(0o1777)
    return d


def test_path_is_named_after_the_daemon_instance():
    assert piddir.path_for("/run/embedshim/3f9a/") == "/dev/shm/embedshim-3f9a"


def test_a_new_directory_is_made_private(shm):
    path = str(shm / "embedshim-k")
    assert piddir.prepare(path) == path
    st = os.lstat(path)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    assert piddir.prepare(path) == path  # the daemon's own, from an earlier run


def test_a_directory_someone_else_made_is_not_used(shm):
    path = shm / "embedshim-k"
    path.mkdir(mode=0o700)
    os.chown(path, 65534, 65534)  # made by nobody before the daemon came
    assert piddir.prepare(str(path)) is None


def test_an_open_directory_is_not_used(shm):
    path = shm / "embedshim-k"
    path.mkdir()
    path.chmod(0o755)
    assert piddir.prepare(str(path)) is None


def test_a_link_is_not_followed(shm, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (shm / "embedshim-k").symlink_to(elsewhere)
    assert piddir.prepare(str(shm / "embedshim-k")) is None


def test_a_parent_anyone_may_rename_in_is_not_used(tmp_path):
    parent = tmp_path / "open"
    parent.mkdir()
    parent.chmod(0o777)  # world-writable without the sticky bit
    assert piddir.prepare(str(parent / "embedshim-k")) is None
    assert not (parent / "embedshim-k").exists()


def test_file_names_cannot_collide():
    # '+' is in no containerd identifier; '.' is: "a.b"/"c" and "a"/"b.c" stay apart.
    names = {
        piddir.file_name("a.b", "c"),
        piddir.file_name("a", "b.c"),
        piddir.file_name("a", "b", "c"),
        piddir.file_name("a", "b"),
    }
    assert len(names) == 4
    assert piddir.file_name("k8s.io", "web", "probe-1") == "k8s.io+web+exec-probe-1.pid"


def test_remove_files_takes_one_tasks_files_only(shm):
    path = str(shm / "embedshim-k")
    piddir.prepare(path)
    mine = [piddir.file_name("ns", "a"), piddir.file_name("ns", "a", "e1")]
    others = [piddir.file_name("ns", "ab"), piddir.file_name("ns2", "a")]
    for name in mine + others:
        with open(os.path.join(path, name), "w") as f:
            f.write("1")
    piddir.remove_files(path, "ns", "a")
    assert sorted(os.listdir(path)) == sorted(others)
    piddir.remove(path)  # not empty: stays, a successor's runc may be writing there
    assert os.path.isdir(path)
    piddir.remove_files(path, "ns", "ab")
    piddir.remove_files(path, "ns2", "a")
    piddir.remove(path)
    assert not os.path.exists(path)
